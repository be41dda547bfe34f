"""Population trainer: M members of one architecture trained at once as one vectorized computation.

Parameters live in one flat `(M, P)` buffer (layers are views). Activations are laid out `(B, M, *features)`:
convolutions run as fused per-member Triton kernels on CUDA (`_convpool.py`) or one grouped convolution
(groups = M), linear layers as one batched matmul, so one step costs a few kernel launches whatever M is
(and one CUDA graph replay with `cuda_graphs`). Each member has its own seed-determined init, data order,
dropout masks, activation, optimizer, lr, weight decay, dropout rate, pruning mask and data factors; nothing
per-member runs in Python inside the step loop. A member's data order comes from a counter-based hash of
(seed, epoch, index), so the same member sees the same batches alone (`zoo.solo`), in any population, and
on any device.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._config import UsageError
from . import _convpool
from ._convpool import available as triton_available, conv_pool
from .config import MemberSpec
from .data import ImageData
from .models import (ACTIVATIONS, Activation, ClassToken, GlobalAvgPool, PatchEmbed, Residual, SelfAttention, create_model,
                     flatten_state, init_weights)

CONV_PATHS = ("auto", "grouped", "unfold", "fused")
_MASK32 = 0xFFFFFFFF
TAG_SUBSET, TAG_NOISE, TAG_NOISE_LABEL, TAG_EVAL, TAG_DROPOUT = -1, -2, -3, -4, -5


def hash32(seed: torch.Tensor, tag: int, idx: torch.Tensor) -> torch.Tensor:
    """Counter-based hash -> int64 in [0, 2^32). Integer ops only: identical on every device."""
    h = (seed * 0x9E3779B1 + (tag + 16) * 0x85EBCA77 + idx * 0x2545F491) & _MASK32
    for _ in range(2):
        h = ((h >> 16) ^ h) * 0x45D9F3B & _MASK32
    return (h >> 16) ^ h


def member_order(seeds: torch.Tensor, epoch: int, n: int, pool: torch.Tensor | None = None) -> torch.Tensor:
    """(M, n) int64: each member's shuffled sample order for `epoch`; members' pools come first."""
    idx = torch.arange(n, device=seeds.device)
    keys = hash32(seeds[:, None], epoch, idx[None, :])  # (M, n)
    if pool is not None:
        keys = torch.where(pool, keys, keys + (1 << 40))
    return torch.sort(keys, dim=1, stable=True).indices


def member_pools(members: Sequence[MemberSpec], y_train: torch.Tensor) -> torch.Tensor | None:
    """(M, N) bool: the training samples each member may use (train_fraction, class_subset); None = all."""
    if all(m.train_fraction == 1.0 and not m.class_subset for m in members):
        return None
    n, dev = len(y_train), y_train.device
    seeds = torch.tensor([m.seed for m in members], device=dev)
    draw = torch.sort(hash32(seeds[:, None], TAG_SUBSET, torch.arange(n, device=dev)), dim=1, stable=True).indices
    keep = torch.tensor([int(math.floor(m.train_fraction * n)) for m in members], device=dev)
    pool = torch.zeros(len(members), n, dtype=torch.bool, device=dev)
    pool.scatter_(1, draw, torch.arange(n, device=dev).expand(len(members), -1) < keep[:, None])
    classes = class_table(members, int(y_train.max()) + 1, dev)
    return pool if classes is None else pool & classes[:, y_train]


def class_table(members: Sequence[MemberSpec], num_classes: int, device) -> torch.Tensor | None:
    """(M, K) bool: the classes each member trains and is evaluated on (all for members without a
    class_subset), K covering num_classes and every listed id; None when no member has a subset.
    Indexed by labels, `table[:, y]` is the (M, N) mask of samples that count for each member."""
    if not any(m.class_subset for m in members):
        return None
    k = max([num_classes] + [c + 1 for m in members for c in m.classes() or []])
    table = torch.ones(len(members), k, dtype=torch.bool)
    for i, m in enumerate(members):
        if m.classes():
            table[i] = False
            table[i, m.classes()] = True
    return table.to(device)


def noisy_labels(y: torch.Tensor, idx: torch.Tensor, seeds: torch.Tensor, noise: torch.Tensor,
                 num_classes: int) -> torch.Tensor:
    """Labels each member trains on: a seeded fraction `noise` of samples gets a uniform random label."""
    flip = hash32(seeds[:, None], TAG_NOISE, idx).double() / 2**32 < noise[:, None]
    rand = hash32(seeds[:, None], TAG_NOISE_LABEL, idx) % num_classes
    return torch.where(flip, rand, y[idx])


# ---- the population forward pass: one function per layer type of the registry ----

def runs(values: Sequence[str]) -> list[tuple[str, int, int]]:
    """[(value, start, stop)]: maximal runs of equal consecutive values (members sorted by value give one each)."""
    out, start = [], 0
    for value, group in itertools.groupby(values):
        n = len(list(group))
        out.append((value, start, start + n))
        start += n
    return out


@dataclass
class _Ctx:
    params: dict[str, torch.Tensor]  # name -> (M, *shape)
    act_runs: list[tuple[str, int, int]]  # per-member activation: (name, first member, end) runs along M
    dropout: torch.Tensor | None  # (M,) rates while training, None when off
    step_key: torch.Tensor | None  # (M,) int64, a member's key for this step's dropout masks
    conv: str = "grouped"  # "grouped" conv, "unfold" (im2col + batched matmul) or "fused" (Triton, _convpool.py)
    bf16: bool = False  # bf16 autocast is on (the fused kernels then run in bf16 as torch's conv would)
    n_dropout: int = 0  # dropout layers seen so far in this forward pass


def _member_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(M,) per-member values, broadcast against a (B, M, *features) activation of `ndim` dims."""
    return v.view(1, -1, *[1] * (ndim - 2))


def _out_size(size: int, k: int, pad: int, dil: int, stride: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _fusable(m: nn.Conv2d, pool: nn.Module | None = None) -> bool:
    """Square kernel, equal strides/paddings, no dilation or groups (and a plain k x k, stride k max-pool)."""
    sq = lambda v: v[0] == v[1]
    ok = sq(m.kernel_size) and sq(m.stride) and sq(m.padding) and m.dilation == (1, 1) and m.groups == 1
    if pool is not None:
        k, s = pool.kernel_size, pool.stride
        ok = ok and isinstance(k, int) and s in (k, (k, k)) and pool.padding == 0 and pool.dilation == 1 \
            and not pool.ceil_mode
    return ok and m.padding_mode == "zeros"


def _conv_pool(m: nn.Conv2d, p: str, x: torch.Tensor, ctx: _Ctx, pool: int = 1) -> torch.Tensor:
    """Triton conv (+ max-pool) on (B, M, C, H, W); in bf16 under autocast, as torch's conv would be."""
    w, b = ctx.params[p + "weight"], ctx.params[p + "bias"]
    if ctx.bf16:
        x = x.to(torch.bfloat16)
    return conv_pool(x.contiguous(), w, b, m.stride[0], m.padding[0], pool)


def _conv(m: nn.Conv2d, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    w, b = ctx.params[p + "weight"], ctx.params[p + "bias"]  # (M, O, C, k, k), (M, O)
    M, O = w.shape[:2]
    B, Mx, C, H, W = x.shape
    kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation)
    if ctx.conv == "fused" and _fusable(m):  # the band kernel (it reads a shared input once, too)
        return _conv_pool(m, p, x, ctx)
    if Mx == 1 and M > 1:  # every member sees the same images (evaluation): one dense conv
        y = F.conv2d(x[:, 0], w.reshape(M * O, C, *w.shape[3:]), b.reshape(-1), **kw)
    elif ctx.conv == "unfold":  # (1, M, O, C*k*k) @ (B, M, C*k*k, L): batched matmul on tensor cores
        cols = F.unfold(x.reshape(B, M * C, H, W), w.shape[3:], m.dilation, m.padding, m.stride)
        y = (w.reshape(1, M, O, -1) @ cols.view(B, M, -1, cols.shape[-1])) + b.view(1, M, O, 1)
        h2, w2 = (_out_size(s, k, p_, d, st) for s, k, p_, d, st in
                  zip((H, W), w.shape[3:], m.padding, m.dilation, m.stride))
        return y.view(B, M, O, h2, w2)
    else:  # (B, M*C, H, W) * (M*O, C, k, k), groups = M
        y = F.conv2d(x.reshape(B, M * C, H, W), w.reshape(M * O, C, *w.shape[3:]), b.reshape(-1), groups=M, **kw)
    return y.view(B, M, O, *y.shape[-2:])


def _linear(m: nn.Linear, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    w, b = ctx.params[p + "weight"], ctx.params[p + "bias"]  # (M, O, I), (M, O)
    if x.shape[1] == 1 and w.shape[0] > 1:  # shared input (evaluation)
        y = torch.einsum("b...i,moi->bm...o", x[:, 0], w)
    else:
        y = torch.einsum("bm...i,moi->bm...o", x, w)
    return y + b.view(1, b.shape[0], *[1] * (y.dim() - 3), b.shape[1])


def _pool(m: nn.MaxPool2d, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    y = F.max_pool2d(x.flatten(1, 2), m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    return y.view(*x.shape[:3], *y.shape[-2:])


def _dropout(m: nn.Dropout, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """Inverted dropout with per-member rates. Masks hash (member key, layer, element): a member's
    masks do not depend on which other members share its population."""
    if ctx.dropout is None:
        return x
    ctx.n_dropout += 1
    B, M = x.shape[:2]
    key = hash32(ctx.step_key, ctx.n_dropout, torch.zeros_like(ctx.step_key)) & 0x7FFFFFFF  # (M,)
    elem = torch.arange(B * x[0, 0].numel(), device=x.device).view(B, 1, *x.shape[2:])
    # the xor keeps inductor from folding arange * constant into an int32 index expression, which
    # overflows for ~10^7-element activations (torch 2.11: "Scalar ... is out of range for type int32")
    u = hash32(_member_view(key, x.dim()), 0, elem ^ 0x5BD1E995)  # (B, M, ...) uniform in [0, 2^32)
    keep = _member_view(1.0 - ctx.dropout, x.dim())
    return x * (u >= _member_view(ctx.dropout.double() * 2**32, x.dim())) / keep


def _layer_norm(m: nn.LayerNorm, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    w, b = ctx.params[p + "weight"], ctx.params[p + "bias"]  # (M, D)
    y = F.layer_norm(x, m.normalized_shape, eps=m.eps)
    shape = (1, w.shape[0], *[1] * (x.dim() - 3), w.shape[1])
    return y * w.view(shape) + b.view(shape)


def _patch_embed(m: PatchEmbed, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    t = _conv(m.proj, p + "proj.", x, ctx).flatten(3).transpose(2, 3)  # (B, M, P, D)
    cls, pos = ctx.params[p + "cls"], ctx.params[p + "pos"]  # (M, 1, 1, D), (M, 1, P+1, D)
    t = torch.cat([cls.transpose(0, 1).expand(len(t), -1, -1, -1), t], dim=2)
    return t + pos.transpose(0, 1)


def _attention(m: SelfAttention, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    B, M, T, D = x.shape
    q, k, v = _linear(m.qkv, p + "qkv.", x, ctx).reshape(B * M, T, 3, m.heads, D // m.heads).permute(2, 0, 3, 1, 4)
    # explicit softmax attention: T is tiny, and fused kernels reject batch B*M in the 10^5 range
    att = torch.softmax((q @ k.transpose(-1, -2)) * (D // m.heads) ** -0.5, dim=-1)
    y = att @ v  # (B*M, heads, T, D/heads)
    return _linear(m.out, p + "out.", y.transpose(1, 2).reshape(B, M, T, D), ctx)


def _join(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """torch.cat without the copy when there is one part (a population with one activation/optimizer)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _activation(x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """Each member's own activation on its slice of (B, M, ...)."""
    return _join([ACTIVATIONS[name](x[:, a:b]) for name, a, b in ctx.act_runs], dim=1)


def _sequential(m: nn.Sequential, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    children = list(m.named_children())
    i = 0
    while i < len(children):
        name, child = children[i]
        nxt = children[i + 1][1] if i + 1 < len(children) else None
        if (ctx.conv == "fused" and isinstance(child, nn.Conv2d) and isinstance(nxt, nn.MaxPool2d)
                and _fusable(child, nxt)):  # conv -> max-pool in one kernel
            x = _conv_pool(child, f"{p}{name}.", x, ctx, nxt.kernel_size)
            i += 2
            continue
        x = run_layer(child, f"{p}{name}.", x, ctx)
        i += 1
    return x


_OPS: dict[type, Callable] = {
    nn.Sequential: _sequential, nn.Conv2d: _conv, nn.Linear: _linear, nn.MaxPool2d: _pool,
    nn.Dropout: _dropout, nn.LayerNorm: _layer_norm, PatchEmbed: _patch_embed, SelfAttention: _attention,
    nn.Flatten: lambda m, p, x, ctx: x.flatten(2),
    Activation: lambda m, p, x, ctx: _activation(x, ctx),
    GlobalAvgPool: lambda m, p, x, ctx: x.mean(dim=(-2, -1)),
    Residual: lambda m, p, x, ctx: x + _sequential(m.body, p + "body.", x, ctx),
    ClassToken: lambda m, p, x, ctx: x[..., 0, :],
}


def run_layer(m: nn.Module, prefix: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    op = _OPS.get(type(m))
    if op is None:
        raise TypeError(f"population trainer has no rule for layer type {type(m).__name__} at '{prefix}'")
    return op(m, prefix, x, ctx)


# ---- vectorized optimizers: torch.optim's update rules with per-member lr and weight decay ----

N_BUFFERS = {"adam": 2, "sgd": 1, "rmsprop": 1}


def _opt_state(names: Sequence[str], flat: torch.Tensor) -> list[torch.Tensor]:
    """(M, P) buffers, as many as the hungriest optimizer present needs; others use the first ones."""
    return [torch.zeros_like(flat) for _ in range(max(N_BUFFERS[n] for n in names))]


def _update(name: str, p, g, bufs, lr, wd, t):
    """One parameter tensor's update; lr, wd, t broadcast as (M, 1, ...). Returns (new p, new buffers)."""
    g = g + wd * p
    if name == "adam":  # torch.optim.Adam, betas (0.9, 0.999), eps 1e-8, L2 weight decay
        m, v = bufs
        m = m.lerp(g, 0.1)
        v = v * 0.999 + 0.001 * g * g
        denom = v.sqrt() / (1 - 0.999 ** t).sqrt() + 1e-8
        return p - lr / (1 - 0.9 ** t) * m / denom, [m, v]
    if name == "sgd":  # momentum 0.9, buffer starts at the first gradient
        buf = torch.where(t == 1, g, bufs[0] * 0.9 + g)
        return p - lr * buf, [buf]
    sq = bufs[0] * 0.99 + 0.01 * g * g  # rmsprop: alpha 0.99, eps 1e-8
    return p - lr * g / (sq.sqrt() + 1e-8), [sq]


# ---- the population ----

def _activation_numel(template: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """(sum, max) over leaf layers of output elements for one input sample."""
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: sizes.append(o.numel()))
             for m in template.modules() if not list(m.children())]
    with torch.no_grad():
        template.eval()(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return sum(sizes), max(sizes)


def member_bytes(template: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> int:
    """Rough device memory one member needs while training: params, grads, optimizer state, activations."""
    n_par = sum(p.numel() for p in template.parameters())
    total, _ = _activation_numel(template, input_shape)
    return 4 * (6 * n_par + 3 * batch_size * total + batch_size * math.prod(input_shape))


def init_member(template_fn: Callable[[], nn.Module], m: MemberSpec) -> nn.Module:
    g = torch.Generator().manual_seed(m.seed)
    return init_weights(template_fn(), m.init, m.init_scale, g)


def init_flat(scratch: nn.Module, members: Sequence[MemberSpec]) -> torch.Tensor:
    """(M, P) initial weights, state_dict order; row i equals `flatten_state(init_member(..., members[i]))`.
    One module re-initialised per member (`init_weights` sets every parameter): building a module per
    member cost 7x more, mostly in the dummy forward that sizes the classifier."""
    rows = []
    for m in members:
        init_weights(scratch, m.init, m.init_scale, torch.Generator().manual_seed(m.seed))
        rows.append(flatten_state(scratch))
    return torch.stack(rows)


class Population:
    """M members of one architecture sharing the batch size. Activations and optimizers may differ per
    member; members sorted by them (as `zoo.build` plans populations) make one slice each."""

    def __init__(self, architecture: str, architecture_kwargs: dict, members: Sequence[MemberSpec], data: ImageData,
                 prune_epochs: Sequence[int] = (), train_eval_samples: int = 0, precision: str = "fp32",
                 compile: bool = False, eval_bytes: int = 1 << 30, conv: str = "auto", cuda_graphs: bool = False):
        if len({m.batch_size for m in members}) != 1:
            raise ValueError(f"a population shares its batch size; got {sorted({m.batch_size for m in members})}")
        self.members, self.data, self.device = list(members), data, data.x_train.device
        self.batch_size = members[0].batch_size
        self.act_runs = runs([m.activation for m in members])
        self.opt_runs = runs([m.optimizer for m in members])
        C, H, W = data.input_shape
        build = lambda: create_model(architecture, in_channels=C, input_size=H, num_classes=data.num_classes,
                                     activation=members[0].activation, dropout=0.0, **architecture_kwargs)
        self.template = build()
        state = self.template.state_dict()
        self.names = list(state)
        # one (M, P) buffer in state_dict order; layers are views into it, so the optimizer is one update
        self.flat = init_flat(build(), members).to(self.device)
        self.shapes = [tuple(state[n].shape) for n in self.names]
        self.offsets = [0] + list(itertools.accumulate(math.prod(sh) for sh in self.shapes))
        prunable = {f"{n}.weight" for n, mod in self.template.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
        self.prunable = [i for i, n in enumerate(self.names) if n in prunable]
        self.prunable_cols = torch.cat([torch.arange(self.offsets[i], self.offsets[i + 1]) for i in self.prunable]
                                       or [torch.zeros(0, dtype=torch.long)]).to(self.device)  # conv/linear weights
        self.mask: torch.Tensor | None = None  # (M, P) pruning mask, ones outside conv/linear weights
        self.state = _opt_state([name for name, _, _ in self.opt_runs], self.flat)
        hp = lambda k, dt=torch.float32: torch.tensor([getattr(m, k) for m in members], dtype=dt, device=self.device)
        self.lr, self.wd, self.dropout, self.noise = hp("lr"), hp("weight_decay"), hp("dropout"), hp("label_noise")
        self.prune_target = hp("prune_fraction")
        self.has_dropout = any(m.dropout > 0 for m in members)
        self.seeds = hp("seed", torch.int64)
        self.t = torch.zeros(len(members), device=self.device)
        self.diverged = torch.zeros(len(members), dtype=torch.bool, device=self.device)
        self.pool = member_pools(members, data.y_train)
        self.class_table = class_table(members, data.num_classes, self.device)  # (M, K) or None: evaluation masks
        n_pool = self.pool.sum(1) if self.pool is not None else torch.full_like(self.seeds, len(data.y_train))
        self.n_steps = n_pool // self.batch_size  # (M,) drop_last, as a DataLoader with drop_last=True
        self.uneven = bool((self.n_steps != self.n_steps.max()).any())
        if int(self.n_steps.min()) < 1:
            raise UsageError(f"a member has {int(n_pool.min())} training samples, fewer than batch_size="
                             f"{self.batch_size}; raise train_fraction or lower batch_size")
        self.prune_epochs = sorted(prune_epochs)
        self.train_eval_samples = train_eval_samples
        self.precision = precision
        if conv not in CONV_PATHS:
            raise UsageError(f"conv must be one of {', '.join(CONV_PATHS)}, got {conv!r}")
        if conv == "auto":  # the Triton kernels where they run natively, else PyTorch's grouped conv
            conv = "fused" if self.device.type == "cuda" and triton_available(self.device) else "grouped"
        self.conv = conv
        _, act_max = _activation_numel(self.template, data.input_shape)
        self.eval_chunk = max(1, eval_bytes // (4 * len(members) * act_max * 3))
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graph: torch.cuda.CUDAGraph | None = None  # captured on the first graphed run_steps
        self._loss_fn = torch.compile(self._loss, dynamic=False) if compile else self._loss
        self._apply_fn = torch.compile(self._apply, dynamic=False) if compile else self._apply
        self._eval_fn = torch.compile(self._eval_chunk, dynamic=False) if compile else self._eval_chunk
        # the graphed step's batch (step and epoch as device tensors): ~60 tiny integer ops (hashes for labels
        # and dropout keys) fused into a few kernels; eagerly each is a kernel of ~2 us in every step's graph
        self._batch_fn = torch.compile(self._batch, dynamic=False) if compile else self._batch
        if compile and self.conv == "fused":
            self._prepare_kernels()

    def _prepare_kernels(self) -> None:
        """One eager training step and each split's first evaluation chunk with the conv kernels' launches
        recorded, not run: fills the kernels' index-map caches, which dynamo must not see change while it
        traces (torch 2.11 fails the guard on that dict), and JIT-compiles the kernel specializations they
        launch in threads (one after another they took ~13 s per process on the H100). The compiled step and
        evaluation are meant to launch the same ones; whether all match is not yet checked (benchmarks/NOTES.md,
        session 7)."""
        with _convpool.recording() as launches:
            xb, y, _, key = self._batch(self.epoch_order(1), 1, 0)
            flat = self.flat.detach().requires_grad_(True)
            torch.autograd.grad(self._loss(flat, xb, y, key)[0], flat)
            with torch.no_grad():
                for split in self._eval_splits():
                    self._eval_chunk(self.flat, *next(self._eval_chunks(split)))
        _convpool.precompile(launches)

    @property
    def size(self) -> int:
        return len(self.members)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """(M, P) -> per-tensor views (M, *shape), state_dict order."""
        return [flat[:, a:b].view(-1, *sh) for a, b, sh in zip(self.offsets, self.offsets[1:], self.shapes)]

    @property
    def params(self) -> list[torch.Tensor]:
        return self.views(self.flat)

    def forward(self, x: torch.Tensor, train: bool, params: list[torch.Tensor] | None = None,
                step_key: torch.Tensor | None = None) -> torch.Tensor:
        """(B, M or 1, C, H, W) float -> (B, M, num_classes) logits; dropout on when `train`."""
        params = self.params if params is None else params  # list of (M, *shape) tensors
        on = train and self.has_dropout
        ctx = _Ctx(dict(zip(self.names, params)), self.act_runs, self.dropout if on else None,
                   step_key if on else None, self.conv, self.precision == "bf16")
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            return run_layer(self.template, "", x, ctx).float()

    def _loss(self, flat, xb, y, step_key):
        """flat (M, P), xb (B, M, C, H, W) uint8, y (B, M) -> (sum of finite member losses, (M,) losses)."""
        B, M = y.shape
        logits = self.forward(self.data.normalize(xb), True, self.views(flat), step_key)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(B, M).mean(0)
        return torch.where(torch.isfinite(loss), loss, 0.0).sum(), loss

    def _apply(self, flat, grad, state, t, active, diverged, loss):
        """Every member's optimizer update, in place on flat, state, t and diverged (inside the compiled
        graph, so the write-backs fuse into the update's kernels instead of costing copies and tiny kernels
        of their own every step). Members whose loss is not finite become diverged and are zeroed; inactive
        members keep their values. flat, grad, state (M, P); t, active, diverged, loss (M,)."""
        diverged.logical_or_(~torch.isfinite(loss))
        on = active & ~diverged
        t_new = t + on.float()
        col = lambda v: v[:, None]
        new, bufs = self._update_runs(flat, grad, state, col(self.lr), col(self.wd), col(t_new.clamp(min=1)))
        if self.mask is not None:
            new = new * self.mask
        new = torch.where(col(diverged), 0.0, torch.where(col(on), new, flat))
        bufs = [torch.where(col(on), b, s) for b, s in zip(bufs, state)]
        for old, value in zip([flat, *state, t], [new, *bufs, t_new]):
            old.copy_(value)

    def _update_runs(self, flat, grad, state, lr, wd, t):
        """Each member's own optimizer on its rows of the flat buffer: one update per optimizer run."""
        news, parts = [], []
        for name, a, b in self.opt_runs:
            rows = [v[a:b] for v in state]
            new, bufs = _update(name, flat[a:b], grad[a:b], rows[:N_BUFFERS[name]], lr[a:b], wd[a:b], t[a:b])
            news.append(new)
            parts.append(bufs + rows[len(bufs):])  # buffers this optimizer does not use stay as they are
        return _join(news), [_join(list(col)) for col in zip(*parts)]

    def step(self, xb: torch.Tensor, y: torch.Tensor, active: torch.Tensor, step_key: torch.Tensor) -> None:
        """One training step of every member, in place. No host synchronisation (graph-capturable)."""
        flat = self.flat.detach().requires_grad_(True)
        total, loss = self._loss_fn(flat, xb, y, step_key)
        (grad,) = torch.autograd.grad(total, flat)
        with torch.no_grad():
            self._apply_fn(self.flat, grad, self.state, self.t, active, self.diverged, loss.detach())

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """(M, N) each member's shuffled sample order for `epoch` (its pool first)."""
        return member_order(self.seeds, epoch, len(self.data.y_train), self.pool)

    def _batch(self, order: torch.Tensor, epoch, s):
        """Step s of `epoch` (ints, or 0-dim device tensors inside a CUDA graph): (xb (B, M, C, H, W)
        uint8, labels (B, M), active (M,), dropout keys (M,)), cut from `order` by index, no DataLoader."""
        B = self.batch_size
        idx = order.index_select(1, s * B + torch.arange(B, device=self.device))  # (M, B)
        xb = self.data.x_train[idx.T]
        y = noisy_labels(self.data.y_train, idx, self.seeds, self.noise, self.data.num_classes).T
        active = (s < self.n_steps) if self.uneven else torch.ones_like(self.diverged)
        step_key = hash32(self.seeds, TAG_DROPOUT, self.seeds * 0 + (epoch * 2**20 + s)) & 0x7FFFFFFF
        return xb, y, active, step_key

    def run_steps(self, order: torch.Tensor, epoch: int, steps: range) -> None:
        """Steps `steps` of `epoch`, batches cut from `order`. With cuda_graphs, the whole step (batch
        gather, forward, backward, optimizer, step counter) is one CUDA graph replay."""
        if self.cuda_graphs and len(steps) > 3:
            return self._run_steps_graphed(order, epoch, steps)
        for s in steps:
            self.step(*self._batch(order, epoch, s))

    def _graph_body(self) -> None:
        self.step(*self._batch_fn(self._g_order, self._g_epoch, self._g_step))
        self._g_step.add_(1)

    def _run_steps_graphed(self, order: torch.Tensor, epoch: int, steps: range) -> None:
        start = steps.start
        if self._graph is None:  # static inputs, two real warm-up steps on a side stream, then capture
            self._g_order = order.clone()
            self._g_epoch = torch.tensor(epoch, device=self.device)
            self._g_step = torch.tensor(start, device=self.device)
            with torch.cuda.device(self.device):  # capture on this population's GPU, not the current one
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._graph_body()
                torch.cuda.current_stream().wait_stream(side)
                start += 2
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph):  # records, does not run
                    self._graph_body()
        else:
            self._g_order.copy_(order)
            self._g_epoch.fill_(epoch)
            self._g_step.fill_(start)
        for _ in range(start, steps.stop):
            self._graph.replay()

    def train_epoch(self, epoch: int, max_steps: int | None = None) -> None:
        """Epoch `epoch` (1-based): every member passes once over its own shuffled pool
        (only the first `max_steps` batches of it, if given); pruning follows at scheduled epochs."""
        n_steps = int(self.n_steps.max())
        self.run_steps(self.epoch_order(epoch), epoch, range(min(n_steps, max_steps or n_steps)))
        if epoch in self.prune_epochs:
            self.prune((self.prune_epochs.index(epoch) + 1) / len(self.prune_epochs) * self.prune_target)

    @torch.no_grad()
    def prune(self, fraction: torch.Tensor) -> None:
        """Global magnitude pruning per member to `fraction` (M,) of conv/linear weights; masks persist."""
        cols = self.prunable_cols
        w = self.flat[:, cols].abs()  # (M, P_w)
        k = (fraction * w.shape[1]).round().long()
        rank = torch.argsort(torch.argsort(w, dim=1, stable=True), dim=1)
        if self.mask is None:
            self._graph = None  # the captured update had no mask: capture again
        mask = torch.ones_like(self.flat) if self.mask is None else self.mask
        mask[:, cols] *= (rank >= k[:, None]).float()
        self.mask = mask
        self.flat.mul_(mask)

    @torch.no_grad()
    def sparsity(self) -> torch.Tensor:
        return (self.flat[:, self.prunable_cols] == 0).float().mean(1)

    def _split(self, split: str):
        """(x uint8, labels (M, N) or (N,), weights (M, N) bool or None) for evaluation."""
        d = self.data
        if split == "train":
            n = len(d.y_train)
            idx = torch.arange(n, device=self.device)
            if 0 < self.train_eval_samples < n:  # a fixed subsample, the same for every member
                idx = torch.sort(torch.argsort(hash32(torch.tensor(0, device=self.device), TAG_EVAL, idx))
                                 [: self.train_eval_samples]).values
            y = noisy_labels(d.y_train, idx.expand(self.size, -1), self.seeds, self.noise, d.num_classes)
            w = self.pool[:, idx] if self.pool is not None else None
            return d.x_train[idx], y, w
        x, y = (d.x_test, d.y_test) if split == "test" else (d.x_val, d.y_val)
        return x, y, self.class_table[:, y] if self.class_table is not None else None

    def _eval_chunk(self, flat, xb, y, w):
        """xb (b, C, H, W) uint8 images every member sees, y (b, M) labels, w (b, M) bool: which samples count
        for which member -> (M,) loss sum, correct count, sample count (float64)."""
        w = w.double()
        logits = self.forward(self.data.normalize(xb)[:, None], False, self.views(flat))  # (b, M, classes)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(w)
        return (ce.double() * w).sum(0), ((logits.argmax(-1) == y).double() * w).sum(0), w.sum(0)

    def _eval_chunks(self, split: str):
        """The arguments of `_eval_chunk` after `flat`, chunk by chunk of `split`: images (b, C, H, W), labels
        (b, M), which samples count for which member (b, M) bool. All chunks have one size (the last one padded
        with images that count for no member), so compile traces one shape."""
        x, y, w = self._split(split)
        n = len(x)
        y = y if y.dim() == 2 else y[None].expand(self.size, -1)  # (M, n) labels
        w = w if w is not None else torch.ones(self.size, n, dtype=torch.bool, device=self.device)  # (M, n)
        chunk = min(self.eval_chunk, n)
        for a in range(0, n, chunk):
            i = torch.arange(a, a + chunk, device=self.device)
            ok = i < n
            i = i.clamp(max=n - 1)
            yield x[i], y[:, i].T, (w[:, i] & ok).T

    def _eval_splits(self) -> list[str]:
        return ["train", "test"] + (["val"] if self.data.x_val is not None else [])

    @torch.no_grad()
    def evaluate(self) -> dict[str, torch.Tensor]:
        """Loss and accuracy of every member on train (its own pool and labels), test and val: (M,) each."""
        out = {}
        for split in self._eval_splits():
            sums = torch.zeros(3, self.size, dtype=torch.float64, device=self.device)  # loss, correct, count
            for args in self._eval_chunks(split):
                sums += torch.stack(self._eval_fn(self.flat, *args))
            out[f"{split}_loss"] = (sums[0] / sums[2]).float()
            out[f"{split}_acc"] = (sums[1] / sums[2]).float()
        if self.prunable and self.prune_epochs:
            out["sparsity"] = self.sparsity()
        bad = self.diverged | ~torch.isfinite(self.flat_weights()).all(1)
        return {k: torch.where(bad, float("nan"), v) for k, v in out.items()}

    @torch.no_grad()
    def flat_weights(self) -> torch.Tensor:
        """(M, n_params) float32 in state_dict order; diverged members are NaN."""
        return torch.where(self.diverged[:, None], float("nan"), self.flat.detach().float())
