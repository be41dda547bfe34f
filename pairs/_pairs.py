"""Pair selection and the linear path between two members (naive and weight-matched)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

import zoo
from zoo import Permuter, UsageError
from zoo.cli import to_yaml
from zoo.io import atomic_path, check_new_output, output_lock

from .config import PairsConfig

SEED_FREE = ("seed", "data_seed")  # hyperparameters two members of one recipe may differ in


def _recipes(z: zoo.Zoo) -> list[str]:
    """Each member's hyperparameters without its seed, as one comparable key."""
    return [repr(sorted((k, v) for k, v in vars(m).items() if k not in SEED_FREE)) for m in z.members()]


def pick_pairs(z: zoo.Zoo, relations, n: int, seed: int, slot: int, z_b: zoo.Zoo | None = None) -> pd.DataFrame:
    """Pairs (member_a, slot_a, member_b, slot_b, relation), at most n per relation, of usable members with one
    activation (interpolating between two activations computes neither network). other_order: same recipe and
    seed (one init), other data order (data_seed); other_init: same recipe, other seed (init and data order);
    other_hparams: other recipe; checkpoints: one member at an earlier checkpoint and at `slot`; other_dataset:
    member i of `z` and member i of `z_b` (twin zoos share member draws)."""
    rng = np.random.default_rng(seed)
    slot = slot % z.n_checkpoints
    ok = np.flatnonzero(z.usable([slot]))
    acts, recipes = z.activations(), _recipes(z)
    seeds = z.field("seed")
    rows = []
    for rel in relations:
        if rel == "checkpoints":
            cand = [(m, s, m, slot) for m in ok for s in range(slot) if z.usable([s])[m]]
        elif rel == "other_dataset":
            ok_b, acts_b = set(np.flatnonzero(z_b.usable([slot])).tolist()), z_b.activations()
            cand = [(m, slot, m, slot) for m in ok if m in ok_b and acts[m] == acts_b[m]]
        else:  # other_order / other_init: one recipe, one seed or two; other_hparams: two recipes
            same, one_init = rel != "other_hparams", rel == "other_order"
            cand = [(a, slot, b, slot) for i, a in enumerate(ok) for b in ok[i + 1:]
                    if acts[a] == acts[b] and (recipes[a] == recipes[b]) == same
                    and (not same or (seeds[a] == seeds[b]) == one_init)]
        pick = rng.permutation(len(cand))[:n]
        rows += [(*cand[i], rel) for i in sorted(pick)]
    return pd.DataFrame(rows, columns=["member_a", "slot_a", "member_b", "slot_b", "relation"])


def barrier(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """(N, A) metric along the path -> (N,) largest shortfall from the straight line between the ends."""
    a = np.linspace(0, 1, values.shape[1])[None]
    line = (1 - a) * values[:, :1] + a * values[:, -1:]
    return (line - values if higher_is_better else values - line).max(1)


def path_metrics(spec: zoo.ModelSpec, Wa: np.ndarray, Wb: np.ndarray, data, acts, alphas: int, split: str = "test",
                 batch_members: int = 1024) -> dict[str, np.ndarray]:
    """Loss and accuracy along W(a) = (1 - a) Wa + a Wb for `alphas` points, all pairs x points evaluated as one
    batch of weight vectors: {"loss", "acc": (N, A)}."""
    a = torch.linspace(0, 1, alphas)[None, :, None]  # (1, A, 1)
    Wa_, Wb_ = torch.as_tensor(Wa)[:, None], torch.as_tensor(Wb)[:, None]  # (N, 1, P)
    W = ((1 - a) * Wa_ + a * Wb_).reshape(-1, Wa.shape[1])  # (N * A, P)
    ev = zoo.evaluate(spec, W, data, [act for act in acts for _ in range(alphas)], (split,),
                      batch_members=batch_members)
    return {k: ev[f"{split}_{k}"].reshape(len(Wa), alphas) for k in ("loss", "acc")}


def _measure(spec, Wa, Wb, data, acts, cfg: PairsConfig, permuter: Permuter) -> dict[str, np.ndarray]:
    """Naive and weight-matched paths: the average (a = 0.5), barriers of loss and accuracy."""
    Wb_matched = np.stack([permuter.align(torch.from_numpy(b), torch.from_numpy(a)).numpy() for a, b in zip(Wa, Wb)])
    out = {}
    for mode, B in (("naive", Wb), ("matched", Wb_matched)):
        path = path_metrics(spec, Wa, B, data, acts, cfg.alphas, cfg.split, cfg.batch_members)
        mid = cfg.alphas // 2
        out[f"{mode}_avg_acc"], out[f"{mode}_avg_loss"] = path["acc"][:, mid], path["loss"][:, mid]
        out[f"{mode}_barrier_loss"] = barrier(path["loss"], higher_is_better=False)
        out[f"{mode}_barrier_acc"] = barrier(path["acc"], higher_is_better=True)
        if mode == "naive":
            out["acc_a"], out["acc_b"] = path["acc"][:, 0], path["acc"][:, -1]
    ends = [zoo.evaluate(spec, W, data, acts, (cfg.split,), batch_members=cfg.batch_members, predictions=True)
            [f"{cfg.split}_pred"] for W in (Wa, Wb)]
    out["agreement"] = (ends[0] == ends[1]).reshape(len(Wa), -1).mean(1)  # same prediction, test images / tokens
    tethers = [e for e in spec.layout() if e.name.endswith(".tether")]
    if tethers:  # tether compatibility: sum of T_a * T_b over tether entries, here averaged over them
        cols = np.concatenate([np.arange(e.offset, e.offset + e.size) for e in tethers])
        out["tether_compat"] = (Wa[:, cols] * Wb[:, cols]).mean(1)
    out["l2"] = np.linalg.norm(Wa - Wb, axis=1)
    out["l2_matched"] = np.linalg.norm(Wa - Wb_matched, axis=1)
    out["cosine"] = (Wa * Wb).sum(1) / (np.linalg.norm(Wa, axis=1) * np.linalg.norm(Wb, axis=1) + 1e-12)
    return out


def pair_table(cfg: PairsConfig, progress: bool = True) -> Path:
    """Pick pairs, measure them, write the pair table (Parquet, config and version in its metadata)."""
    z = zoo.open(cfg.zoo)
    z_b = zoo.open(cfg.zoo_b) if cfg.zoo_b else None
    if z_b is not None and (z_b.spec.layout() != z.spec.layout() or z_b.architecture != z.architecture):
        raise UsageError(f"{cfg.zoo_b} holds {z_b.architecture} members with another layout than {cfg.zoo} "
                         f"({z.architecture}); pairs need one architecture")
    out = Path(cfg.out or Path(cfg.zoo).with_suffix(".pairs.parquet"))
    check_new_output(out, False, "pair table")
    pairs = pick_pairs(z, cfg.relations, cfg.n_per_relation, cfg.seed, cfg.checkpoint, z_b)
    if not len(pairs):
        raise UsageError(f"no pairs of relations {list(cfg.relations)} in {cfg.zoo} (members of one activation)")
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if cfg.device == "auto" else cfg.device)
    data, acts, permuter = z.dataset(device=device), z.activations(), Permuter.of(z.spec)
    cols = []
    with output_lock(out):
        for rel, group in tqdm(pairs.groupby("relation", sort=False), desc="pairs", unit="relation",
                               disable=not progress):
            zb = z_b if rel == "other_dataset" else z
            Wa = np.stack([z.weights(m, s) for m, s in zip(group["member_a"], group["slot_a"])])
            Wb = np.stack([zb.weights(m, s) for m, s in zip(group["member_b"], group["slot_b"])])
            cols.append(group.assign(**_measure(z.spec, Wa, Wb, data, [acts[m] for m in group["member_a"]], cfg,
                                                permuter)))
        table = pd.concat(cols, ignore_index=True)
        meta = {"weightzoo": to_yaml(cfg) + f"version: {zoo.__version__}\nbuild_id: {z.build_id}\n"}
        arrow = pa.Table.from_pandas(table, preserve_index=False)
        with atomic_path(out) as tmp:
            pq.write_table(arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), **meta}), tmp)
    return out
