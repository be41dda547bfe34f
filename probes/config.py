"""The probe stage's typed config."""
from __future__ import annotations

from dataclasses import dataclass

from zoo import Config, UsageError, option


@dataclass(frozen=True)
class ProbeConfig(Config):
    """`python -m probes.evaluate` config: zoos (one architecture), embeddings, targets, split and intervals."""
    zoo: list[str] = ("data/zoos/digits_default.h5",)
    embeddings: list[str] = ()  # one per zoo, from one encoder; () = <zoo>.embeddings.h5 where every zoo has one
    targets: list[str] = ()  # () = every target that varies
    regress: list[str] = ()  # targets regressed (R²) even with few values, e.g. [train_fraction, dropout] as HR21
    columns: list[str] = ()  # probe columns to fit (probes.COLUMNS, e.g. "emb linear"); () = every one the inputs allow
    checkpoints: list[int] = ()  # checkpoint slots to use (negative counts from the end); () = all
    out: str = ""  # output directory; default data/probes/<first zoo name>
    seed: int = option(0, ge=0)
    test_fraction: float = option(0.2, gt=0, lt=1)  # of members, when the hyperrep's split is not used
    bootstrap: int = option(200, ge=0)  # resamples of test members for the 95 % intervals
    split: str = ""  # a split file (JSON {"test_members": [...]} or a benchmark's CSV): fixed test members
    members: str = option("all", choices=("all", "fit"))  # fit: only the members the encoder was fitted on
    device: str = option("auto", choices=("auto", "cpu", "cuda"))  # linear probes' decompositions, logistic fits

    def check(self):
        if not self.zoo:
            raise UsageError("give at least one zoo (--zoo A.h5 [B.h5 ...])")
        if len(set(self.zoo)) != len(self.zoo):
            dup = next(z for z in self.zoo if self.zoo.count(z) > 1)
            raise UsageError(f"zoo {dup} is listed twice; list each zoo once")
        if self.embeddings and len(self.embeddings) != len(self.zoo):
            raise UsageError(f"got {len(self.embeddings)} embeddings files for {len(self.zoo)} zoos; give one per zoo")
