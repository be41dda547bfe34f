"""Sequence data generated in process (no download), for sequence members such as `gpt_t`.

A zoo config selects it with `dataset: sequence` and a `sequence:` mapping (`SequenceSpec`):

    sequence: {task: memorize, n_sequences: 16, length: 32, context: 16, vocab: 16}   # one sequence per member
    sequence: {task: modular, modulus: 23, train_split: 0.5}                          # grokking: (a + b) mod p
    sequence: {task: continual, modulus: 11, switch_epoch: 10}                        # (a + b), then (a - b) mod p
    sequence: {task: continual_memorize, length: 32, context: 16, switch_epoch: 10}   # sequence A, then B

Samples are token windows `x (N, T)` int64 with next-token targets `y (N, T)` (-1 where no loss is taken) and a
group id per sample (`groups`): the sequence a window was cut from (memorize) or the task (continual). A
member's `class_subset` selects groups, exactly as it selects classes of an image dataset: with
`class_subset: {subset: [16, 1]}` each member memorises one of the 16 sequences of the bank and is evaluated
on it. Everything is a pure function of the spec (its `seed`), so a zoo's data is re-made bit for bit on read.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from .cli import UsageError, require
from .data import ImageData

TASKS = ("memorize", "modular", "continual", "continual_memorize")


@dataclass(frozen=True)
class SequenceSpec:
    """The `sequence:` keys of a zoo config. memorize: `n_sequences` random sequences of `length + 1` tokens
    over `vocab`, cut into every window of `context + 1` tokens. modular / continual: every pair (a, b) of
    0..modulus-1 as `[a, op, b, =]` with the answer as the target of the last position; `train_split` of the
    pairs train, the rest test (the same split for every member). continual trains task A, (a + b) mod p, up
    to `switch_epoch`, then task B, (a - b) mod p; continual_memorize memorises sequence A, then sequence B
    (two random sequences, tested on what was stored: forgetting is what B overwrote of A)."""
    task: str = "memorize"
    seed: int = 0
    vocab: int = 16
    n_sequences: int = 16
    length: int = 32
    context: int = 16
    modulus: int = 23
    train_split: float = 0.5
    switch_epoch: int = 0  # continual: last epoch of task A; 0 = half the epochs

    def __post_init__(self):
        checks = [
            (self.task in TASKS, "task", f"one of {', '.join(TASKS)}"),
            (self.seed >= 0, "seed", ">= 0"), (self.vocab >= 2, "vocab", ">= 2"),
            (self.n_sequences >= 1, "n_sequences", ">= 1"), (self.context >= 1, "context", ">= 1"),
            (self.length >= self.context, "length", f">= context ({self.context})"),
            (self.modulus >= 2, "modulus", ">= 2"), (0 < self.train_split < 1, "train_split", "in (0, 1)"),
            (self.switch_epoch >= 0, "switch_epoch", ">= 0"),
        ]
        require(self, checks, "sequence.{key}")

    @classmethod
    def of(cls, mapping: dict | None) -> "SequenceSpec":
        mapping = dict(mapping or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - names)
        if unknown:
            raise UsageError(f"unknown key 'sequence.{unknown[0]}'; valid: {', '.join(sorted(names))}")
        try:
            return cls(**{k: (str if k == "task" else type(getattr(cls, k)))(v) for k, v in mapping.items()})
        except (TypeError, ValueError):
            raise UsageError(f"sequence keys must be numbers (task a name), got {mapping}") from None

    def switch(self, epochs: int) -> int:
        return self.switch_epoch or max(1, epochs // 2)


@dataclass
class SequenceData(ImageData):
    """Token windows in place of images: x (N, T) int64 tokens, y (N, T) int64 targets (-1: no loss), and
    `groups_*` (N,) the group each sample belongs to (its sequence or task). `num_classes` is the vocabulary."""
    groups_train: torch.Tensor | None = None
    groups_test: torch.Tensor | None = None
    n_groups: int = 1
    task_names: tuple[str, ...] = ()  # continual: the name of each group's task

    label_dims = 1

    def to(self, device) -> "SequenceData":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return SequenceData(**moved)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x  # tokens go to the embedding as they are

    def groups(self, split: str) -> torch.Tensor:
        return self.groups_train if split == "train" else self.groups_test

    @property
    def num_groups(self) -> int:
        return self.n_groups


def _memorize(s: SequenceSpec) -> tuple:
    rng = np.random.default_rng(s.seed)
    seqs = rng.integers(0, s.vocab, size=(s.n_sequences, s.length + 1))  # (S, L + 1)
    starts = np.arange(s.length - s.context + 1)
    win = seqs[:, starts[:, None] + np.arange(s.context + 1)]  # (S, W, T + 1)
    x, y = win[..., :-1].reshape(-1, s.context), win[..., 1:].reshape(-1, s.context)
    g = np.repeat(np.arange(s.n_sequences), len(starts))
    return (x, y, g), (x, y, g), s.vocab, s.n_sequences, ()  # memorisation is measured on what was stored


def _pairs(p: int, op_token: int, sign: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a, b = np.divmod(np.arange(p * p), p)
    x = np.stack([a, np.full_like(a, op_token), b, np.full_like(a, p)], 1)  # [a, op, b, =]
    y = np.full_like(x, -1)
    y[:, -1] = (a + sign * b) % p
    return x, y, np.full(len(a), group)


def _modular(s: SequenceSpec) -> tuple:
    p = s.modulus
    tasks = [(p + 1, 1, 0)] if s.task == "modular" else [(p + 1, 1, 0), (p + 2, -1, 1)]  # tokens: p is '='
    train, test = [], []
    for op, sign, group in tasks:
        x, y, g = _pairs(p, op, sign, group)
        order = np.random.default_rng([s.seed, group]).permutation(len(x))
        cut = max(1, int(round(s.train_split * len(x))))
        tr, te = np.sort(order[:cut]), np.sort(order[cut:])
        train.append((x[tr], y[tr], g[tr]))
        test.append((x[te], y[te], g[te]))
    cat = lambda parts: tuple(np.concatenate(col) for col in zip(*parts))
    names = () if s.task == "modular" else ("a", "b")
    return cat(train), cat(test), p + 1 + len(tasks), len(tasks), names


def _continual_memorize(s: SequenceSpec) -> tuple:
    train, test, vocab, _, _ = _memorize(dataclasses.replace(s, n_sequences=2))
    return train, test, vocab, 2, ("a", "b")


def make_sequences(spec: SequenceSpec, name: str = "sequence") -> SequenceData:
    make = {"memorize": _memorize, "continual_memorize": _continual_memorize}.get(spec.task, _modular)
    (xt, yt, gt), (xs, ys, gs), vocab, n_groups, names = make(spec)
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int64)
    one = torch.ones(1)
    return SequenceData(name, t(xt), t(yt), t(xs), t(ys), None, None, one * 0, one, vocab,
                        groups_train=t(gt), groups_test=t(gs), n_groups=n_groups, task_names=names)
