"""The hyperrep stage's typed config."""
from __future__ import annotations

from dataclasses import dataclass

from zoo import Config, UsageError, option

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


@dataclass(frozen=True)
class FitConfig(Config):
    """`python -m hyperrep.fit` config: data, tokens, model size, loss, augmentations, training."""
    name: str = "digits_default"
    zoo: str | list[str] = "data/zoos/digits_default.h5"  # one zoo, or several of one architecture
    out: str = ""  # run directory; default data/hyperrep/<name>
    checkpoints: list[int] = option((), ge=0, each=True)  # checkpoint slots to learn from; () = all
    splits: list[float] = option((0.7, 0.15, 0.15), ge=0, le=1, each=True)  # train / val / test fractions of members
    split_seed: int = option(0, ge=0)
    max_members: int = option(0, ge=0)  # fit on the first N usable members of each zoo, the rest excluded (0: all)
    token_size: int = option(64, ge=1)
    window: int = option(0, ge=0)  # train on random windows of this many tokens; 0 = whole models
    d_model: int = option(64, ge=1)
    n_layers: int = option(2, ge=1)
    n_heads: int = option(4, ge=1)
    d_latent: int = option(16, ge=1)
    d_proj: int = option(32, ge=1)
    dropout: float = option(0.0, ge=0, lt=1)
    gamma: float = option(0.05, ge=0, le=1)  # weight of the contrastive loss
    tau: float = option(0.1, gt=0)
    permute: bool = True  # random function-preserving permutations per view
    align: bool = False  # weight-match every member to the first training member first
    noise_mult: float = option(0.05, ge=0)
    noise_add: float = option(0.05, ge=0)
    erase: float = option(0.1, ge=0, lt=1)  # probability of erasing a token in the input
    normalize: str = option("layer", choices=("layer", "global"))  # standardise tokens per tensor, or one mean/std
    loss_norm: str = option("entries", choices=("entries", "layer"))  # MSE over all entries, or each layer equally
    beta: float = option(0.0, ge=0)  # weight of the functional loss: KL of decoded vs original outputs on probes
    probe_images: int = option(256, ge=1)  # training images the functional loss runs the members on
    lr: float = option(1e-3, gt=0)
    weight_decay: float = option(0.01, ge=0)
    batch_size: int = option(32, ge=2)  # the contrastive loss needs two members per batch
    epochs: int = option(12, ge=1)
    max_steps: int = option(-1, ge=-1)  # -1: no step limit
    max_minutes: float = option(0.0, ge=0)  # stop after this long (0: no limit); model.pt records the epochs done
    precision: str = option("auto", choices=PRECISIONS)  # auto: bf16-mixed on GPU, 32-true on CPU
    accelerator: str = option("auto", choices=ACCELERATORS)
    devices: int = option(1, ge=1)
    num_workers: int = option(0, ge=0)
    seed: int = option(0, ge=0)
    loggers: list[str] = option(("csv",), choices=("csv", "tensorboard", "wandb"), each=True)  # csv is always on
    log_every: int = option(10, ge=1)  # steps between per-step logs (loss, learning rate)

    @property
    def zoo_paths(self) -> tuple[str, ...]:
        return (self.zoo,) if isinstance(self.zoo, str) else tuple(self.zoo)

    def check(self):
        if not self.zoo_paths:
            raise UsageError("give at least one zoo (--zoo A.h5 [B.h5 ...])")
        if len(self.splits) != 3 or abs(sum(self.splits) - 1) > 1e-6:
            raise UsageError(f"splits must be three fractions (train, val, test) summing to 1, got {list(self.splits)}")
        if self.d_model % self.n_heads:
            raise UsageError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")


@dataclass(frozen=True)
class ReconstructConfig(Config):
    """`python -m hyperrep.reconstruct` config: which members and checkpoints to encode and decode."""
    zoo: str = "data/zoos/digits_default.h5"
    model: str = "data/hyperrep/digits_default"
    out: str = ""  # output directory; default data/reconstruct/<run name>
    checkpoints: list[int] = option((), each=True)  # checkpoint slots (negative counts from the end); () = the run's
    members: str = option("test", choices=("test", "val", "train", "all"))  # the run's split, or every usable member
    max_members: int = option(0, ge=0)  # 0: all of them
    permutation_check: bool = True  # reconstruct pi(W) too: |acc(rec(pi W)) - acc(rec(W))| vs between members
    device: str = "auto"
    batch_size: int = option(256, ge=1)
    seed: int = option(0, ge=0)


@dataclass(frozen=True)
class SampleConfig(Config):
    """`python -m hyperrep.sample` config: a density over the embeddings of the best training members, draws,
    decoding, subsampling, fine-tuning against reference groups, and the memorization test."""
    zoo: str = "data/zoos/digits_default.h5"
    model: str = "data/hyperrep/digits_default"
    out: str = ""  # the sampled zoo (.h5); default data/samples/<run name>.h5
    n: int = option(100, ge=1)  # members per group
    top: float = option(0.3, gt=0, le=1)  # anchors: this fraction of the training members, best first
    checkpoint: int = -1  # checkpoint slot of the anchors (and of the memorization comparison)
    # KDE over whole members ("joint": one anchor per draw) or per token (anchors mix, as SANE): on the seed zoo
    # joint with bandwidth 0.2 gave 0.868 test accuracy as drawn, per-token 0.17 (benchmarks/GENERATIVE.md)
    mode: str = option("joint", choices=("token", "joint"))
    bandwidth: float = option(0.2, ge=0)  # KDE bandwidth in units of each latent's spread; 0 = Scott's rule
    subsample: int = option(1, ge=1)  # draw subsample x n, keep the n best on held-out training images
    select_images: int = option(1000, ge=1)  # images of the selection batch (validation split, else training)
    finetune: list[int] = option((0, 1, 5), ge=0, each=True)  # fine-tuning epochs recorded as checkpoints
    dataset: str = ""  # fine-tune and evaluate on another dataset of the same shape (transfer); "" = the zoo's
    data_root: str = "data/datasets"
    groups: list[str] = ("sampled", "scratch", "zoo_top", "held_out", "noise", "average", "gaussian")
    noise: list[float] = option((0.02, 0.04), gt=0, each=True)  # sigma of the noise baselines (absolute)
    average_of: int = option(16, ge=2)  # members averaged per member of the averaging baseline
    device: str = "auto"
    precision: str = option("fp32", choices=("fp32", "bf16"))
    compile: bool = False  # torch.compile the fine-tuning step (GPU)
    cuda_graphs: bool = True  # on CUDA, replay each fine-tuning step as one CUDA graph
    seed: int = option(0, ge=0)

    def check(self):
        known = ("sampled", "scratch", "zoo_top", "held_out", "noise", "average", "gaussian")
        bad = [g for g in self.groups if g not in known]
        if bad or "sampled" not in self.groups:
            raise UsageError(f"groups must include 'sampled' and be among {', '.join(known)}; got {list(self.groups)}")
        if list(self.finetune) != sorted(set(self.finetune)) or not self.finetune or self.finetune[0] != 0:
            raise UsageError(f"finetune must be increasing epochs starting at 0, got {list(self.finetune)}")


@dataclass(frozen=True)
class EmbedConfig(Config):
    """`python -m hyperrep.embed` config."""
    zoo: str = "data/zoos/digits_default.h5"
    model: str = "data/hyperrep/digits_default"
    out: str = ""  # default <zoo>.embeddings.h5 beside the zoo
    device: str = "auto"
    batch_size: int = option(256, ge=1)
    sequence: bool = False  # also store every token's latent (/sequence) for the probes' `emb seq linear` column
