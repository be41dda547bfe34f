"""Batched evaluation of given weights: loss, accuracy and predictions of M weight vectors at once.

Used by the trainer's checkpoint evaluation and by anything else that holds weights (decoded, sampled,
merged or imported networks):

    import zoo
    z = zoo.open("data/zoos/digits_default.h5")
    W = np.stack([z.weights(m, -1) for m in range(8)])                 # (M, P)
    acts = [z.hparams(m).activation for m in range(8)]
    zoo.evaluate(z.spec, W, z.dataset(), acts)                         # {"test_loss": (M,), "test_acc": (M,)}

Every member sees the same images (read once per chunk, member stride 0 in the fused kernels on CUDA).
Chunks have one size (the last padded with images that count for no member), so `compile` traces one shape.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from .cli import UsageError
from .data import ImageData
from .engine import BatchedNet, activation_numel, sample_correct, sample_loss
from .spec import ModelSpec


class Evaluator:
    """Loss, accuracy and predictions of the M members of a `BatchedNet` on a dataset's images."""

    def __init__(self, net: BatchedNet, data: ImageData, eval_bytes: int = 1 << 30, compile: bool = False):
        self.net, self.data = net, data
        _, act_max = activation_numel(net.template, data.input_shape)
        self.chunk = max(1, eval_bytes // (4 * net.size * act_max * 3))  # images per chunk
        self._chunk_fn = torch.compile(self._chunk, dynamic=False) if compile else self._chunk

    def split(self, name: str, class_table: torch.Tensor | None = None):
        """(images (n, C, H, W) uint8, labels (n,), which samples count for which member (M, n) bool or None)
        of the test or val split; `class_table` (M, K) restricts members to their classes."""
        d = self.data
        if name not in ("test", "val") or (name == "val" and d.x_val is None):
            choices = "test or val" if d.x_val is not None else "test"
            raise UsageError(f"split '{name}' does not exist here; use {choices}")
        x, y = (d.x_test, d.y_test) if name == "test" else (d.x_val, d.y_val)
        return x, y, class_table[:, d.groups(name)] if class_table is not None else None

    def _chunk(self, flat, xb, y, w):
        """xb (b, C, H, W) uint8 images every member sees, y (b, M) labels, w (b, M) bool: which samples count
        for which member -> (M,) loss sum, correct count, sample count (float64)."""
        w = w.double()
        logits = self.net.forward(self.data.normalize(xb)[:, None], flat)  # (b, M, classes) or (b, M, T, vocab)
        ce, hit = sample_loss(logits, y), sample_correct(logits, y)  # (b, M) each
        return (ce.double() * w).sum(0), (hit.double() * w).sum(0), w.sum(0)

    def chunks(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> Iterator[tuple]:
        """The arguments of `_chunk` after `flat`, chunk by chunk: images (b, C, H, W), labels (b, M), which
        samples count for which member (b, M) bool. y is (n,) or per member (M, n); w (M, n) or None (all).
        Sequence targets carry one more dim: (n, T) or (M, n, T)."""
        n, M, dev = len(x), self.net.size, x.device
        y = y if y.dim() == 2 + self.data.label_dims else y[None].expand(M, *y.shape)  # (M, n[, T]) labels
        w = w if w is not None else torch.ones(M, n, dtype=torch.bool, device=dev)  # (M, n)
        chunk = min(self.chunk, n)
        for a in range(0, n, chunk):
            i = torch.arange(a, a + chunk, device=dev)
            ok = i < n
            i = i.clamp(max=n - 1)
            yield x[i], y[:, i].transpose(0, 1), (w[:, i] & ok).T

    @torch.no_grad()
    def evaluate(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """flat (M, P) -> mean loss (M,), accuracy (M,) over the samples that count for each member."""
        sums = torch.zeros(3, self.net.size, dtype=torch.float64, device=flat.device)  # loss, correct, count
        for args in self.chunks(x, y, w):
            sums += torch.stack(self._chunk_fn(flat, *args))
        return (sums[0] / sums[2]).float(), (sums[1] / sums[2]).float()

    @torch.no_grad()
    def predict(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """flat (M, P), images (n, C, H, W) uint8 -> predicted classes (M, n) int64."""
        out = []
        for a in range(0, len(x), self.chunk):
            logits = self.net.forward(self.data.normalize(x[a:a + self.chunk])[:, None], flat)  # (b, M, K)
            out.append(logits.argmax(-1).transpose(0, 1))
        return torch.cat(out, 1)


def _sorted_members(activations: Sequence[str]) -> np.ndarray:
    """Order that groups equal activations (one slice each in the batched forward)."""
    return np.argsort(np.asarray(activations, dtype=object).astype(str), kind="stable")


def subset_table(subsets: Sequence[str], num_classes: int, device) -> torch.Tensor | None:
    """(M, K) bool: the classes (sequence data: groups) each member trains and is evaluated on, from its
    class_subset ("" = all); K covers num_classes and every listed id; None when no member has a subset."""
    ids = [[int(c) for c in str(s).split(",")] if str(s) else None for s in subsets]
    if not any(ids):
        return None
    table = torch.ones(len(ids), max([num_classes] + [c + 1 for i in ids if i for c in i]), dtype=torch.bool)
    for row, i in enumerate(ids):
        if i:
            table[row] = False
            table[row, i] = True
    return table.to(device)


def evaluate(spec: ModelSpec, weights, data: ImageData, activations: Sequence[str], splits: Sequence[str] = ("test",),
             conv: str = "auto", precision: str = "fp32", batch_members: int = 1024,
             predictions: bool = False, class_subsets: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Evaluate `weights` (M, P) of architecture `spec` on `data` (on its device): {"<split>_loss",
    "<split>_acc": (M,)} for each split (test, val), and "<split>_pred" (M, n) int64 with `predictions`.
    `class_subsets` (M,) restricts each member to its classes (the build's `class_subset`; for sequence data the
    sequences it memorised), as the build evaluated it. Members are grouped by activation and evaluated
    `batch_members` at a time; non-finite rows give NaN."""
    W = torch.as_tensor(np.asarray(weights, np.float32) if not isinstance(weights, torch.Tensor) else weights)
    if W.dim() != 2 or W.shape[1] != spec.layout().n_params:
        raise UsageError(f"weights must be (members, {spec.layout().n_params}) for {spec.architecture}, "
                         f"got {tuple(W.shape)}")
    if len(activations) != len(W):
        raise UsageError(f"got {len(activations)} activations for {len(W)} weight vectors")
    device = data.x_test.device
    order = _sorted_members(activations)
    out = {f"{s}_{k}": np.full(len(W), np.nan, np.float32) for s in splits for k in ("loss", "acc")}
    for s in splits if predictions else ():
        out[f"{s}_pred"] = np.full((len(W), len(data.y_test if s == "test" else data.y_val)), -1, np.int64)
    for a in range(0, len(W), batch_members):
        ids = order[a:a + batch_members]
        flat = W[ids].to(device, torch.float32)
        ok = torch.isfinite(flat).all(1).cpu().numpy()
        flat = torch.where(torch.isfinite(flat), flat, 0.0)
        ev = Evaluator(BatchedNet(spec, [activations[i] for i in ids], device, conv, precision), data)
        table = subset_table([class_subsets[i] for i in ids], data.num_groups, device) if class_subsets is not None \
            else None
        for s in splits:
            x, y, w = ev.split(s, table)
            loss, acc = ev.evaluate(flat, x, y, w)
            out[f"{s}_loss"][ids] = np.where(ok, loss.cpu().numpy(), np.nan)
            out[f"{s}_acc"][ids] = np.where(ok, acc.cpu().numpy(), np.nan)
            if predictions:
                out[f"{s}_pred"][ids] = np.where(ok[:, None], ev.predict(flat, x).cpu().numpy(), -1)
    return out
