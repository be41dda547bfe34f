"""Population trainer: M members of one architecture trained at once as one vectorized computation.

Parameters live in one flat `(M, P)` buffer (layers are views); the forward pass is the population engine's
(`zoo.engine.BatchedNet`), so one step costs a few kernel launches whatever M is (and one CUDA graph replay
with `cuda_graphs`). Each member has its own seed-determined init, data order, dropout masks, activation,
optimizer, lr, weight decay, dropout rate, pruning mask and data factors; nothing per-member runs in Python
inside the step loop. A member's data order comes from a counter-based hash of (seed, epoch, index), so the
same member sees the same batches alone (`zoo.solo`), in any population, and on any device. Checkpoint
evaluation is the public batched evaluator's (`zoo.evaluation.Evaluator`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import _triton
from ._rng import TAG_DROPOUT, TAG_EVAL, TAG_NOISE, TAG_NOISE_LABEL, TAG_SUBSET, hash32
from .cli import UsageError
from .config import MemberSpec
from .data import ImageData
from .engine import BatchedNet, _join, activation_numel, runs, sample_loss
from .evaluation import Evaluator, subset_table
from .models import MemoryMLP, SegmentedMemoria, flatten_state, init_weights
from .models.tether import compatibility
from .spec import ModelSpec

# The divergence rule: a member is diverged (stopped, its weights NaN in the zoo, excluded downstream) when a
# training loss is not finite, when a weight's magnitude passes EXPLODED, or when, after training has begun,
# its mean loss on its own training split at a checkpoint exceeds BLOWUP x ln(classes), i.e. 10x chance level
# (members trained at lr = 1000 on digits end with |w| of 1e3-1e5, losses of 300-1e11 and chance accuracy).
EXPLODED = 1e6
BLOWUP = 10.0


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
    classes = class_table(members, int(y_train.max()) + 1, dev)  # y_train: each sample's group (its class)
    return pool if classes is None else pool & classes[:, y_train]


def class_table(members: Sequence[MemberSpec], num_classes: int, device) -> torch.Tensor | None:
    """(M, K) bool: the classes each member trains and is evaluated on (all for members without a
    class_subset), K covering num_classes and every listed id; None when no member has a subset.
    Indexed by labels, `table[:, y]` is the (M, N) mask of samples that count for each member."""
    return subset_table([m.class_subset for m in members], num_classes, device)


def noisy_labels(y: torch.Tensor, idx: torch.Tensor, seeds: torch.Tensor, noise: torch.Tensor,
                 num_classes: int) -> torch.Tensor:
    """Labels each member trains on: a seeded fraction `noise` of samples gets a uniform random label."""
    flip = hash32(seeds[:, None], TAG_NOISE, idx).double() / 2**32 < noise[:, None]
    rand = hash32(seeds[:, None], TAG_NOISE_LABEL, idx) % num_classes
    return torch.where(flip, rand, y[idx])


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

def lr_columns(template: nn.Module, layout, device) -> torch.Tensor | None:
    """(P,) learning-rate multiplier per weight: a module's `lr_scale` (gpt_t's memory neurons) for its
    parameters, 0 for buffers (tethers: they never learn), 1 elsewhere; None when every multiplier is 1."""
    cols = torch.ones(layout.n_params)
    for name, m in template.named_modules():
        scale = getattr(m, "lr_scale", 1.0)
        if scale != 1.0:
            for pname, _ in m.named_parameters(recurse=False):
                cols[layout[f"{name}.{pname}"].slice] = scale
        for bname, _ in m.named_buffers(recurse=False):  # buffers (tethers) are state, not trained
            cols[layout[f"{name}.{bname}".lstrip(".")].slice] = 0.0
    return None if bool((cols == 1).all()) else cols.to(device)


@dataclass(frozen=True)
class TetherMerge:
    """When a build merges tethers (zoo config keys of the same names): members whose training loss on a fixed
    batch changed by less than `loss_delta` since the last epoch, or whose gradient norm there is below
    `grad_norm` (0: not used), are ready; two ready members whose tether compatibility, averaged over tether
    entries, exceeds `compat` get the mean of their tethers; at most `max_per_epoch` merges per epoch."""
    loss_delta: float = 0.01
    grad_norm: float = 0.0
    compat: float = 1.0
    max_per_epoch: int = 1


def choose_merges(ready: torch.Tensor, compat: torch.Tensor, threshold: float, max_merges: int) -> list[tuple]:
    """ready (M,) bool, compat (M, M) -> pairs (i, j), i < j, both ready, compat above threshold, most compatible
    first, every member in at most one pair, at most `max_merges` pairs. Two members with one tether (compat equal
    to both self-compatibilities: members of one seed, or merged before) are not paired: averaging changes nothing."""
    M = len(ready)
    i, j = torch.triu_indices(M, M, 1)
    c, d = compat[i, j], compat.diagonal()
    same = torch.isclose(c, d[i], rtol=1e-6) & torch.isclose(c, d[j], rtol=1e-6)
    ok = ready[i] & ready[j] & (c > threshold) & ~same
    order = torch.argsort(compat[i, j].masked_fill(~ok, float("-inf")), descending=True, stable=True)
    chosen, used = [], set()
    for k in order[: int(ok.sum())].tolist():
        a, b = int(i[k]), int(j[k])
        if a not in used and b not in used and len(chosen) < max_merges:
            chosen.append((a, b))
            used |= {a, b}
    return chosen


def member_bytes(template: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> int:
    """Rough device memory one member needs while training: params, grads, optimizer state, activations."""
    n_par = sum(p.numel() for p in template.parameters())
    total, _ = activation_numel(template, input_shape)
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


def spec_for(architecture: str, architecture_kwargs: dict, data: ImageData) -> ModelSpec:
    return ModelSpec(architecture, architecture_kwargs, data.input_shape, data.num_classes)


def check_members(members: Sequence[MemberSpec], spec: ModelSpec, data: ImageData) -> None:
    """What a member asks of the data and the architecture, checked before anything is built or written."""
    if data.label_dims and any(m.label_noise > 0 for m in members):
        raise UsageError("label_noise is for image classes; sequence data takes label_noise 0")
    size = max([m.mem for m in spec.create().modules() if isinstance(m, MemoryMLP)], default=0)
    used = max(m.mem_neurons for m in members)
    if used > size:
        raise UsageError(f"mem_neurons={used} exceeds the architecture's {size} memory neurons per block "
                         f"(architecture_kwargs.fc_mem_dim)")


class _MemberData:
    """What each member sees of the data: its pool of training samples, labels, classes (all (M, ...)).
    Sequence data with tasks (continual) trains task A up to `switch` epochs, then task B: the pool and the
    step counts follow the epoch (`use_epoch`)."""

    def __init__(self, members: Sequence[MemberSpec], data: ImageData, batch_size: int, switch: int = 0):
        dev = data.x_train.device
        hp = lambda k, dt=torch.float32: torch.tensor([getattr(m, k) for m in members], dtype=dt, device=dev)
        self.seeds, self.noise = hp("seed", torch.int64), hp("label_noise")
        self.order_seeds = hp("order_seed", torch.int64)  # data order and dropout (data_seed, else seed)
        base = member_pools(members, data.groups("train"))  # (M, N) bool or None
        self.class_table = class_table(members, data.num_groups, dev)  # (M, K) or None: evaluation masks
        tasks = getattr(data, "task_names", ())
        groups = data.groups("train")
        if tasks:  # one pool per task: the member's pool within the task's samples
            full = base if base is not None else torch.ones(len(members), len(groups), dtype=torch.bool, device=dev)
            self.phases = [full & (groups == g)[None] for g in range(len(tasks))]
        else:
            self.phases = [base]
        self.switch, self.batch_size, self.n = switch, batch_size, len(groups)
        steps = [self._steps(pool) for pool in self.phases]
        self.uneven = len(steps) > 1 or bool((steps[0] != steps[0].max()).any())
        self.pool, self.n_steps = self.phases[0], steps[0].clone()

    def _steps(self, pool: torch.Tensor | None) -> torch.Tensor:
        n_pool = pool.sum(1) if pool is not None else torch.full_like(self.seeds, self.n)
        if int(n_pool.min()) < self.batch_size:
            raise UsageError(f"a member has {int(n_pool.min())} training samples, fewer than batch_size="
                             f"{self.batch_size}; raise train_fraction or lower batch_size")
        return n_pool // self.batch_size  # (M,) drop_last, as a DataLoader with drop_last=True

    def use_epoch(self, epoch: int) -> None:
        """The pool of `epoch`'s task; n_steps is updated in place (a captured CUDA graph reads it)."""
        if not self.switch:
            return
        self.pool = self.phases[min(int(epoch > self.switch), len(self.phases) - 1)]
        self.n_steps.copy_(self._steps(self.pool))


class Population:
    """M members of one architecture sharing the batch size. Activations and optimizers may differ per
    member; members sorted by them (as `zoo.build` plans populations) make one slice each."""

    def __init__(self, architecture: str, architecture_kwargs: dict, members: Sequence[MemberSpec], data: ImageData,
                 prune_epochs: Sequence[int] = (), train_eval_samples: int = 0, precision: str = "fp32",
                 compile: bool = False, eval_bytes: int = 1 << 30, conv: str = "auto", cuda_graphs: bool = False,
                 initial: torch.Tensor | None = None, switch: int = 0, tether_merge: TetherMerge | None = None):
        if len({m.batch_size for m in members}) != 1:
            raise ValueError(f"a population shares its batch size; got {sorted({m.batch_size for m in members})}")
        self.members, self.data, self.device = list(members), data, data.x_train.device
        self.batch_size = members[0].batch_size
        self.net = BatchedNet(spec_for(architecture, architecture_kwargs, data), [m.activation for m in members],
                              self.device, conv, precision)
        self.opt_runs = runs([m.optimizer for m in members])
        # one (M, P) buffer in state_dict order; layers are views into it, so the optimizer is one update
        if initial is not None:  # given weights (decoded, sampled, merged members): fine-tuning
            if tuple(initial.shape) != (len(members), self.net.layout.n_params):
                raise ValueError(f"initial weights must be ({len(members)}, {self.net.layout.n_params}), "
                                 f"got {tuple(initial.shape)}")
            self.flat = initial.detach().to(self.device, torch.float32).clone()
        else:
            self.flat = init_flat(self.net.spec.create(members[0].activation), members).to(self.device)
        entries = [self.net.layout[i] for i in self.prunable]
        self.prunable_cols = torch.cat([torch.arange(e.offset, e.offset + e.size) for e in entries]
                                       or [torch.zeros(0, dtype=torch.long)]).to(self.device)  # conv/linear weights
        self.mask: torch.Tensor | None = None  # (M, P) pruning / memory-neuron mask, ones elsewhere
        check_members(members, self.net.spec, data)
        self.lr_cols = lr_columns(self.net.template, self.net.layout, self.device)  # (P,) lr multipliers or None
        self._mask_memory([m.mem_neurons for m in members], [m.memoria for m in members])
        self.state = _opt_state([name for name, _, _ in self.opt_runs], self.flat)
        hp = lambda k: torch.tensor([getattr(m, k) for m in members], dtype=torch.float32, device=self.device)
        self.lr, self.wd, self.dropout, self.prune_target = hp("lr"), hp("weight_decay"), hp("dropout"), \
            hp("prune_fraction")
        self.has_dropout = any(m.dropout > 0 for m in members)
        self.t = torch.zeros(len(members), device=self.device)
        self.diverged = torch.zeros(len(members), dtype=torch.bool, device=self.device)
        self.epoch = 0  # epochs trained so far
        self.switch = switch
        self.mine = _MemberData(members, data, self.batch_size, switch if getattr(data, "task_names", ()) else 0)
        self.best_a = torch.zeros(len(members), device=self.device)  # continual: best task-A test accuracy so far
        self.tether_merge = tether_merge if self.net.tethered else None
        self.tether_cols = torch.cat([torch.arange(self.net.layout[f"{n}.tether"].offset,
                                                   self.net.layout[f"{n}.tether"].offset
                                                   + self.net.layout[f"{n}.tether"].size)
                                      for n in self.net.tethered] or [torch.zeros(0, dtype=torch.long)]).to(self.device)
        self.merges = torch.zeros(len(members), device=self.device)  # tether merges so far, per member
        self.partner = torch.full((len(members),), -1.0, device=self.device)  # the last merge partner (index)
        self._last_loss: torch.Tensor | None = None
        self._merge_batch: tuple | None = None
        self.prune_epochs = sorted(prune_epochs)
        self.train_eval_samples = train_eval_samples
        if any(isinstance(mod, SegmentedMemoria) for mod in self.net.template.modules()):
            # Memoria's engram bookkeeping has data-dependent shapes and host syncs: eager, no graphs
            compile = cuda_graphs = False
        self.evaluator = Evaluator(self.net, data, eval_bytes, compile)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graph: torch.cuda.CUDAGraph | None = None  # captured on the first graphed run_steps
        self._loss_fn = torch.compile(self._loss, dynamic=False) if compile else self._loss
        self._apply_fn = torch.compile(self._apply, dynamic=False) if compile else self._apply
        # the graphed step's batch (step and epoch as device tensors): ~60 tiny integer ops (hashes for labels
        # and dropout keys) fused into a few kernels; eagerly each is a kernel of ~2 us in every step's graph
        self._batch_fn = torch.compile(self._batch, dynamic=False) if compile else self._batch
        if compile and self.conv == "fused":
            self._prepare_kernels()

    # the engine's and member data's fields, read by tests and benchmarks
    act_runs = property(lambda self: self.net.act_runs)
    conv = property(lambda self: self.net.conv)
    precision = property(lambda self: self.net.precision)
    template = property(lambda self: self.net.template)
    seeds = property(lambda self: self.mine.seeds)
    n_steps = property(lambda self: self.mine.n_steps)
    eval_chunk = property(lambda self: self.evaluator.chunk)

    @property
    def prunable(self) -> list[int]:
        """Layout indices of conv/linear weights (what magnitude pruning may zero)."""
        names = {f"{n}.weight" for n, mod in self.net.template.named_modules()
                 if isinstance(mod, (nn.Conv2d, nn.Linear))}
        return [i for i, e in enumerate(self.net.layout) if e.name in names]

    def _prepare_kernels(self) -> None:
        """One eager training step and each split's first evaluation chunk with the conv kernels' launches
        recorded, not run: fills the kernels' index-map caches, which dynamo must not see change while it
        traces (torch 2.11 fails the guard on that dict), and JIT-compiles the kernel specializations they
        launch in threads (one after another they took ~13 s per process on the H100). Whether the compiled
        step and evaluation launch only these is not checked (benchmarks/NOTES.md, "Open")."""
        with _triton.recording() as launches:
            xb, y, _, key = self._batch(self.epoch_order(1), 1, 0)
            flat = self.flat.detach().requires_grad_(True)
            torch.autograd.grad(self._loss(flat, xb, y, key)[0], flat)
            with torch.no_grad():
                for split in self._eval_splits():
                    self.evaluator._chunk(self.flat, *next(self.evaluator.chunks(*self._split(split))))
        _triton.precompile(launches)

    @property
    def size(self) -> int:
        return len(self.members)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """(M, P) -> per-tensor views (M, *shape), state_dict order."""
        return self.net.views(flat)

    @property
    def params(self) -> list[torch.Tensor]:
        return self.views(self.flat)

    def forward(self, x: torch.Tensor, train: bool, params: list[torch.Tensor] | None = None,
                step_key: torch.Tensor | None = None) -> torch.Tensor:
        """(B, M or 1, C, H, W) float -> (B, M, num_classes) logits; dropout on when `train`."""
        on = train and self.has_dropout
        return self.net.forward(x, self.params if params is None else params, self.dropout if on else None,
                                step_key if on else None)

    def _loss(self, flat, xb, y, step_key):
        """flat (M, P), xb (B, M, C, H, W) uint8, y (B, M) -> (sum of finite member losses, (M,) losses)."""
        B, M = y.shape[:2]
        logits = self.forward(self.data.normalize(xb), True, self.views(flat), step_key)
        loss = sample_loss(logits, y).mean(0)  # (B, M) -> (M,)
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
        lr = col(self.lr) if self.lr_cols is None else col(self.lr) * self.lr_cols  # (M, 1) or (M, P)
        new, bufs = self._update_runs(flat, grad, state, lr, col(self.wd), col(t_new.clamp(min=1)))
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
        return member_order(self.mine.order_seeds, epoch, len(self.data.y_train), self.mine.pool)

    def _batch(self, order: torch.Tensor, epoch, s):
        """Step s of `epoch` (ints, or 0-dim device tensors inside a CUDA graph): (xb (B, M, C, H, W)
        uint8, labels (B, M), active (M,), dropout keys (M,)), cut from `order` by index, no DataLoader."""
        B, seeds = self.batch_size, self.mine.order_seeds
        idx = order.index_select(1, s * B + torch.arange(B, device=self.device))  # (M, B)
        xb = self.data.x_train[idx.T]
        y = self._labels(idx).transpose(0, 1)  # (B, M) or (B, M, T)
        active = (s < self.mine.n_steps) if self.mine.uneven else torch.ones_like(self.diverged)
        step_key = hash32(seeds, TAG_DROPOUT, seeds * 0 + (epoch * 2**20 + s)) & 0x7FFFFFFF
        return xb, y, active, step_key

    def _labels(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (M, n) -> the labels each member trains on (M, n), or per-position targets (M, n, T)."""
        d = self.data
        if d.label_dims:  # sequences: no label noise (checked)
            return d.y_train[idx]
        return noisy_labels(d.y_train, idx, self.mine.seeds, self.mine.noise, d.num_classes)

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
        (only the first `max_steps` batches of it, if given); pruning follows at scheduled epochs.
        Members whose weights exploded (|w| > EXPLODED) are then flagged as diverged."""
        self.mine.use_epoch(epoch)
        n_steps = int(self.mine.n_steps.max())
        self.run_steps(self.epoch_order(epoch), epoch, range(min(n_steps, max_steps or n_steps)))
        self.epoch = epoch
        if epoch in self.prune_epochs:
            self.prune((self.prune_epochs.index(epoch) + 1) / len(self.prune_epochs) * self.prune_target)
        self.flag_exploded()
        if self.tether_merge is not None:
            self.merge_tethers()

    def merge_tethers(self) -> list[tuple[int, int]]:
        """The tether merge rule (TetherMerge), applied after an epoch: the merged pairs (population indices)."""
        rule = self.tether_merge
        if self._merge_batch is None:  # one fixed batch per member, cut once
            self._merge_batch = self._batch(self.epoch_order(0), 0, 0)
        xb, y, _, key = self._merge_batch
        flat = self.flat.detach().requires_grad_(rule.grad_norm > 0)
        with torch.set_grad_enabled(rule.grad_norm > 0):
            total, loss = self._loss(flat, xb, y, key)
        ready = torch.zeros_like(self.diverged)
        if self._last_loss is not None:
            ready = (loss.detach() - self._last_loss).abs() < rule.loss_delta
        if rule.grad_norm > 0:
            ready |= torch.autograd.grad(total, flat)[0].norm(dim=1) < rule.grad_norm
        self._last_loss = loss.detach()
        ready &= ~self.diverged
        T = self.flat[:, self.tether_cols]  # (M, n)
        pairs = choose_merges(ready, compatibility(T, T) / max(T.shape[1], 1), rule.compat, rule.max_per_epoch)
        with torch.no_grad():
            for a, b in pairs:
                mean = (T[a] + T[b]) / 2
                self.flat[a, self.tether_cols] = mean
                self.flat[b, self.tether_cols] = mean
                self.merges[[a, b]] += 1
                self.partner[a], self.partner[b] = b, a
        return pairs

    @torch.no_grad()
    def flag_exploded(self) -> None:
        """Divergence rule: a member whose loss was not finite (flagged in the step) or whose largest weight
        magnitude exceeds EXPLODED is diverged; its weights are zeroed and it trains no further."""
        exploded = ~(self.flat.abs().amax(1) <= EXPLODED)  # NaN counts as exploded
        self.diverged |= exploded
        self.flat.mul_((~self.diverged).float()[:, None])

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
    def _mask_memory(self, used: list[int], memoria: list[bool]) -> None:
        """Members that use fewer memory neurons than the architecture has: the rest are zero for good; members
        without Memoria (in an architecture with it): their memory read is zero for good (it adds nothing)."""
        mems = [(n, m) for n, m in self.net.template.named_modules() if isinstance(m, MemoryMLP)]
        reads = [n for n, m in self.net.template.named_modules() if isinstance(m, SegmentedMemoria)]
        size = max([m.mem for _, m in mems], default=0)
        if all(k in (-1, size) for k in used) and (all(memoria) or not reads):
            return
        k = torch.tensor([size if v == -1 else v for v in used], device=self.device)  # (M,)
        mask = torch.ones_like(self.flat)
        off = torch.tensor([not on for on in memoria], device=self.device)[:, None]  # (M, 1)
        for e in self.net.layout:
            if any(e.name.startswith(f"{r}.read.") for r in reads):
                mask[:, e.slice] = (~off).float().expand(-1, e.size)
        unit = torch.arange(size, device=self.device)  # which memory neuron an entry belongs to:
        owner = {"mem_fc.weight": unit[:, None], "mem_fc.bias": unit, "mem_proj.weight": unit[None, :]}  # (mem, D),
        # (mem,), (D, mem) once broadcast to each tensor's shape
        for name, _ in mems:
            for tensor, who in owner.items():
                e = self.net.layout[f"{name}.{tensor}"]
                mask[:, e.slice] = (who.expand(e.shape).reshape(-1)[None] < k[:, None]).float()
        self.mask = mask
        self.flat.mul_(mask)

    @torch.no_grad()
    def sparsity(self) -> torch.Tensor:
        return (self.flat[:, self.prunable_cols] == 0).float().mean(1)

    def _split(self, split: str):
        """(x uint8, labels (M, N) or (N,), weights (M, N) bool or None) for evaluation. The train split is
        each member's own pool with its own (noisy) labels, on a fixed subsample if train_eval_samples."""
        d, mine = self.data, self.mine
        if split != "train":
            return self.evaluator.split(split, mine.class_table)
        n = len(d.y_train)
        idx = torch.arange(n, device=self.device)
        if 0 < self.train_eval_samples < n:  # a fixed subsample, the same for every member
            idx = torch.sort(torch.argsort(hash32(torch.tensor(0, device=self.device), TAG_EVAL, idx))
                             [: self.train_eval_samples]).values
        y = self._labels(idx.expand(self.size, -1))
        w = mine.pool[:, idx] if mine.pool is not None else None
        return d.x_train[idx], y, w

    def _task_metrics(self) -> dict[str, torch.Tensor]:
        """Continual data: test loss / accuracy per task, and forgetting = the best task-A test accuracy up to
        the switch minus the current one (0 while task A trains)."""
        names = getattr(self.data, "task_names", ())
        if not names:
            return {}
        out = {}
        x, y, w = self.evaluator.split("test", self.mine.class_table)
        groups = self.data.groups("test")
        for g, name in enumerate(names):
            mask = (groups == g)[None].expand(self.size, -1) & (w if w is not None else True)
            out[f"test_{name}_loss"], out[f"test_{name}_acc"] = self.evaluator.evaluate(self.flat, x, y, mask)
        if self.epoch <= self.switch:
            self.best_a = torch.maximum(self.best_a, out[f"test_{names[0]}_acc"])
        out["forgetting"] = self.best_a - out[f"test_{names[0]}_acc"] if self.epoch > self.switch \
            else torch.zeros_like(self.best_a)
        return out

    def _eval_splits(self) -> list[str]:
        return ["train", "test"] + (["val"] if self.data.x_val is not None else [])

    @torch.no_grad()
    def evaluate(self) -> dict[str, torch.Tensor]:
        """Loss and accuracy of every member on train (its own pool and labels), test and val: (M,) each."""
        out = {}
        for split in self._eval_splits():
            out[f"{split}_loss"], out[f"{split}_acc"] = self.evaluator.evaluate(self.flat, *self._split(split))
        out.update(self._task_metrics())
        if self.tether_merge is not None:
            out["tether_merges"], out["tether_partner"] = self.merges.clone(), self.partner.clone()
        if self.prunable and self.prune_epochs:
            out["sparsity"] = self.sparsity()
        if self.epoch >= 1:  # blown up: its loss on its own training data far above chance level
            self.diverged |= ~(out["train_loss"] <= BLOWUP * math.log(self.data.num_classes))
            self.flat.mul_((~self.diverged).float()[:, None])
        bad = self.diverged | ~torch.isfinite(self.flat_weights()).all(1)
        return {k: v if k.startswith("tether_") else torch.where(bad, float("nan"), v) for k, v in out.items()}

    @torch.no_grad()
    def flat_weights(self) -> torch.Tensor:
        """(M, n_params) float32 in state_dict order; diverged members are NaN."""
        return torch.where(self.diverged[:, None], float("nan"), self.flat.detach().float())


PHASES = ("setup", "train", "epoch 1", "evaluate", "epoch 0", "checkpoint")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_and_record(pop: Population, ids: np.ndarray, checkpoints, writer, bar=None,
                     seconds: dict[str, float] | None = None) -> None:
    """Train `pop` to the last of `checkpoints` (epochs), evaluating and handing each checkpoint to `writer`
    (a `zoo.ZooWriter`: rows `ids`, slot k for checkpoints[k]); then mark the members done. Adds wall time per
    phase to `seconds` (synchronised once per epoch, so the split is exact and costs nothing measurable)."""
    seconds = seconds if seconds is not None else dict.fromkeys(PHASES, 0.0)
    slots = {e: k for k, e in enumerate(checkpoints)}
    for epoch in range(max(checkpoints) + 1):
        start = time.perf_counter()
        if epoch > 0:
            pop.train_epoch(epoch)
            sync(pop.device)
        trained = evaluated = handed = time.perf_counter()
        if epoch in slots:
            metrics = {k: v.cpu().numpy() for k, v in pop.evaluate().items()}
            if "tether_partner" in metrics:  # population index -> model id (NaN: never merged)
                p = metrics["tether_partner"]
                metrics["tether_partner"] = np.where(p >= 0, ids[np.clip(p, 0, None).astype(np.int64)], np.nan)
            evaluated = time.perf_counter()
            writer.write(ids, slots[epoch], pop.flat_weights().cpu().numpy(), metrics)
            handed = time.perf_counter()
        seconds["train"] += trained - start
        seconds["epoch 1"] += (trained - start) * (epoch == 1)  # compilation and graph capture land here
        seconds["evaluate"] += evaluated - trained
        seconds["epoch 0"] += (evaluated - trained) * (epoch == 0)  # the evaluation's compilation lands here
        seconds["checkpoint"] += handed - evaluated
        if epoch > 0 and bar is not None:
            bar.set_postfix_str(f"epoch {epoch}: train {trained - start:.1f} s, evaluate {evaluated - trained:.1f} s",
                                refresh=False)
            bar.update(len(ids))  # model-epochs
    writer.done(ids, pop.diverged.cpu().numpy())
