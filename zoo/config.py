"""The zoo stage's typed config and the per-member hyperparameters it expands into."""
from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .cli import Config, UsageError, coerce, option, require
from .data import SCALINGS
from .engine import CONV_PATHS
from .models import ACTIVATIONS, INITS

OPTIMIZERS = ("adam", "sgd", "rmsprop")


@dataclass(frozen=True)
class MemberSpec:
    """Everything that can differ between two members of a zoo (one column each in the table)."""
    seed: int = 0  # init, label noise and sample pool; also data order and dropout unless data_seed is set
    data_seed: int = -1  # seed of the data order and dropout masks (-1: seed); same seed, other data_seed: same init
    init: str = "kaiming_uniform"
    init_scale: float = 1.0
    activation: str = "tanh"
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    dropout: float = 0.0
    batch_size: int = 64
    prune_fraction: float = 0.0
    train_fraction: float = 1.0
    label_noise: float = 0.0
    class_subset: str = ""  # comma-separated class ids ("" = all); sequence data: ids of sequences / tasks
    mem_neurons: int = -1  # memory neurons used per block: the first mem_neurons of gpt_t's fc_mem_dim; -1 = all
    memoria: bool = True  # uses the architecture's Memoria memory (gpt_t memoria=true); false: its memory read is 0

    def __post_init__(self):
        checks = [
            (self.init in INITS, "init", f"one of {', '.join(INITS)}"),
            (self.activation in ACTIVATIONS, "activation", f"one of {', '.join(ACTIVATIONS)}"),
            (self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}"),
            (0 <= self.seed < 2**31, "seed", "in [0, 2^31)"),
            (-1 <= self.data_seed < 2**31, "data_seed", "in [0, 2^31) (or -1: seed)"),
            (self.lr > 0, "lr", "> 0"), (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (0 <= self.dropout < 1, "dropout", "in [0, 1)"), (self.batch_size >= 1, "batch_size", ">= 1"),
            (0 <= self.prune_fraction < 1, "prune_fraction", "in [0, 1)"),
            (0 < self.train_fraction <= 1, "train_fraction", "in (0, 1]"),
            (0 <= self.label_noise <= 1, "label_noise", "in [0, 1]"), (self.init_scale > 0, "init_scale", "> 0"),
            (self.mem_neurons >= -1, "mem_neurons", ">= 0 (or -1: all)"),
        ]
        require(self, checks, "hyperparameter '{key}'")
        if self.class_subset and not all(c.strip().isdigit() for c in self.class_subset.split(",")):
            raise UsageError(f"class_subset must be comma-separated class ids like '0,1,2', got {self.class_subset!r}")

    @property
    def order_seed(self) -> int:
        """The seed of the member's data order and dropout masks."""
        return self.seed if self.data_seed < 0 else self.data_seed

    def classes(self) -> list[int] | None:
        return [int(c) for c in self.class_subset.split(",")] if self.class_subset else None


HPARAMS = tuple(f.name for f in dataclasses.fields(MemberSpec))
_HP_TYPES = typing.get_type_hints(MemberSpec)
# subset: [n, k] draws k of the classes 0..n-1 (class_subset), [n, k_min, k_max] a size in that range first
DISTRIBUTIONS = ("choice", "uniform", "log_uniform", "int_uniform", "subset")


@dataclass(frozen=True)
class ZooConfig(Config):
    """`python -m zoo.build` config. Members = `fixed` hparams, then the `grid` product (or `n_random`
    draws from `random`), each repeated for `seeds` consecutive seeds starting at `seed`, each seed for
    `data_orders` data orders (the first its own, then data_seed = seed + r * 2^24)."""
    name: str = "digits_default"
    dataset: str = "digits"
    data_root: str = "data/datasets"
    download: bool = False
    grayscale: bool = False
    resize: int | None = option(None, ge=1)
    val_fraction: float = option(0.0, ge=0, lt=1)
    input_scaling: str = option("standardize", choices=SCALINGS)  # zoo.data.SCALINGS
    input_mean: list[float] = ()  # per channel, with input_scaling=fixed
    input_std: list[float] = ()
    architecture: str = "cnn_gap"
    architecture_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = option(8, ge=1)
    checkpoints: list[int] = (0, 1, 2, 4, 8)
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    random: dict[str, dict[str, list]] = field(default_factory=dict)
    n_random: int = option(0, ge=0)
    seeds: int = option(1, ge=1)
    data_orders: int = option(1, ge=1)  # each seed trained on this many data orders (same init; data_seed)
    seed: int = option(0, ge=0)
    prune_epochs: list[int] = ()
    population_size: int = option(0, ge=0)  # 0: as many as fit the device memory budget
    memory_fraction: float = option(0.6, gt=0, le=1)  # of free GPU memory (CPU: of 8 GiB) a population may use
    train_eval_samples: int = option(0, ge=0)  # train metrics on this many training samples per member; 0 = all
    device: str = "auto"
    precision: str = option("fp32", choices=("fp32", "bf16"))
    compile: bool = False
    cuda_graphs: bool = True  # on CUDA, replay each training step as one captured CUDA graph (no launch overhead)
    conv: str = option("auto", choices=CONV_PATHS)  # auto: fused (Triton) on CUDA, else grouped; unfold: im2col + bmm
    out: str = ""  # default data/zoos/<name>.h5
    sequence: dict[str, Any] = field(default_factory=dict)  # dataset: sequence -> zoo.sequences.SequenceSpec keys
    # tether merging (architecture_kwargs.tethered: true): see zoo.population.TetherMerge
    tether_merge: bool = False
    merge_loss_delta: float = option(0.01, ge=0)
    merge_grad_norm: float = option(0.0, ge=0)
    merge_compat: float = 1.0  # threshold on the tether compatibility averaged over tether entries
    max_merges_per_epoch: int = option(1, ge=0)

    def check(self):
        bad = [c for c in self.checkpoints if not 0 <= c <= self.epochs]
        if bad or not self.checkpoints or list(self.checkpoints) != sorted(set(self.checkpoints)):
            raise UsageError(f"checkpoints must be increasing epochs in [0, epochs={self.epochs}], "
                             f"got {list(self.checkpoints)}")
        if any(not 1 <= e <= self.epochs for e in self.prune_epochs):
            raise UsageError(f"prune_epochs must lie in [1, epochs={self.epochs}], got {list(self.prune_epochs)}")
        for key, table in (("fixed", self.fixed), ("grid", self.grid), ("random", self.random)):
            for hp in table:
                if hp not in HPARAMS:
                    raise UsageError(f"unknown hyperparameter '{hp}' in {key}; valid: {', '.join(HPARAMS)}")
        for hp, values in self.grid.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise UsageError(f"grid.{hp} must be a non-empty list of values, got {values!r}")
        for hp, spec in self.random.items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise UsageError(f"random.{hp} must be one of {{{', '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
            (dist, args), = spec.items()
            if dist == "subset":
                sizes = args[1:] if isinstance(args, (list, tuple)) and len(args) in (2, 3) else [0]
                if hp != "class_subset" or not 1 <= min(sizes) <= max(sizes) <= args[0]:
                    raise UsageError(f"random.{hp}: subset is for class_subset, as [n_classes, k] or [n_classes, "
                                     f"k_min, k_max] with 1 <= k <= n_classes, got {spec!r}")
                continue
            if dist == "choice" and not args or dist != "choice" and (len(args) != 2 or args[0] > args[1]):
                raise UsageError(f"random.{hp}: {dist} needs " + ("a non-empty list of values" if dist == "choice"
                                 else f"[low, high] with low <= high, got {list(args)}"))
            if dist == "log_uniform" and args[0] <= 0:
                raise UsageError(f"random.{hp}: log_uniform needs low > 0, got {list(args)}")
        if self.random and self.n_random < 1:
            raise UsageError("random sampling needs n_random >= 1 (number of members to draw)")
        if self.grid and self.random:
            raise UsageError("set either grid or random, not both")
        if self.tether_merge and not self.architecture_kwargs.get("tethered"):
            raise UsageError("tether_merge needs tethered members: set architecture_kwargs.tethered=true")
        if self.dataset == "sequence":
            from .sequences import SequenceSpec
            SequenceSpec.of(self.sequence)
        elif self.sequence:
            raise UsageError(f"sequence: keys are for dataset: sequence, not dataset: {self.dataset}")


def _hp(name: str, value: Any, where: str) -> Any:
    return coerce(value, _HP_TYPES[name], f"{where}.{name}")


def _draw(name: str, spec: dict[str, list], rng: np.random.Generator) -> Any:
    (dist, args), = spec.items()
    if dist == "choice":
        return args[int(rng.integers(len(args)))]
    if dist == "subset":  # k of n classes, sorted; every class when k == n
        n, k = args[0], int(rng.integers(args[1], args[-1] + 1))
        return "" if k == n else ",".join(map(str, sorted(rng.choice(n, k, replace=False).tolist())))
    lo, hi = args
    if dist == "uniform":
        return float(rng.uniform(lo, hi))
    if dist == "log_uniform":
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return int(rng.integers(lo, hi + 1))


def expand_members(cfg: ZooConfig) -> list[MemberSpec]:
    """Deterministic member list: grid product (last key fastest) or seeded random draws, times seeds, times
    data orders (consecutive members: one init, other data orders)."""
    base = {k: _hp(k, v, "fixed") for k, v in cfg.fixed.items()}
    if cfg.random:
        rng = np.random.default_rng(cfg.seed)
        combos = [{k: _hp(k, _draw(k, s, rng), "random") for k, s in cfg.random.items()} for _ in range(cfg.n_random)]
    else:
        keys = list(cfg.grid)
        values = [[_hp(k, v, "grid") for v in cfg.grid[k]] for k in keys]
        combos = [dict(zip(keys, vs)) for vs in itertools.product(*values)]
    members = []
    for i, combo in enumerate(combos):
        for s in range(cfg.seeds):
            hp = {**base, **combo}
            hp.setdefault("seed", cfg.seed + i * cfg.seeds + s)
            if "seed" in combo or "seed" in base:
                hp["seed"] = hp["seed"] + s
            for r in range(cfg.data_orders):
                order = {"data_seed": (hp["seed"] + r * 2**24) % 2**31} if r else {}
                members.append(MemberSpec(**{**hp, **order}))
    return members
