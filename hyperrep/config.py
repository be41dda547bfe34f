"""The hyperrep stage's typed config."""
from __future__ import annotations

from dataclasses import dataclass

from zoo._config import UsageError


@dataclass(frozen=True)
class FitConfig:
    """`python -m hyperrep.fit` config: data, tokens, model size, loss, augmentations, training."""
    name: str = "digits_default"
    zoo: str = "data/zoos/digits_default.h5"
    out: str = ""  # run directory; default data/hyperrep/<name>
    checkpoints: list[int] = ()  # checkpoint slots to learn from; () = all
    splits: list[float] = (0.7, 0.15, 0.15)  # train / val / test fractions of members
    split_seed: int = 0
    token_size: int = 64
    window: int = 0  # train on random windows of this many tokens; 0 = whole models
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_latent: int = 16
    d_proj: int = 32
    dropout: float = 0.0
    gamma: float = 0.05  # weight of the contrastive loss
    tau: float = 0.1
    permute: bool = True  # random function-preserving permutations per view
    align: bool = False  # weight-match every member to the first training member first
    noise_mult: float = 0.05
    noise_add: float = 0.05
    erase: float = 0.1  # probability of erasing a token in the input
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    epochs: int = 12
    max_steps: int = -1
    precision: str = "auto"  # bf16-mixed on GPU, 32 on CPU
    accelerator: str = "auto"
    devices: int = 1
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self):
        if len(self.splits) != 3 or abs(sum(self.splits) - 1) > 1e-6 or min(self.splits) < 0:
            raise UsageError(f"splits must be three fractions (train, val, test) summing to 1, got {list(self.splits)}")
        if self.d_model % self.n_heads:
            raise UsageError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not 0 <= self.gamma <= 1 or self.tau <= 0:
            raise UsageError(f"gamma must be in [0, 1] and tau > 0, got gamma={self.gamma} tau={self.tau}")
        if self.token_size < 1 or self.window < 0:
            raise UsageError(f"token_size must be >= 1 and window >= 0, got {self.token_size}, {self.window}")
