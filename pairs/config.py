"""`python -m pairs.build` config."""
from __future__ import annotations

from dataclasses import dataclass

from zoo.cli import Config, UsageError, option

RELATIONS = ("other_order", "other_init", "other_hparams", "checkpoints", "other_dataset")


@dataclass(frozen=True)
class PairsConfig(Config):
    """Which pairs of members to pick and how to measure what merging them does."""
    zoo: str = "data/zoos/digits_default.h5"
    zoo_b: str = ""  # a second zoo of the same architecture: other_dataset pairs member i of zoo with member i here
    relations: list[str] = option(("other_order", "other_init", "other_hparams", "checkpoints"), choices=RELATIONS,
                                  each=True)
    n_per_relation: int = option(64, ge=1)  # at most this many pairs per relation (fewer when fewer exist)
    checkpoint: int = -1  # the checkpoint slot members are taken at (checkpoints: paired with an earlier slot)
    alphas: int = option(11, ge=3)  # points on the linear path W(a) = (1 - a) W_a + a W_b, ends included
    split: str = option("test", choices=("test", "val"))
    seed: int = option(0, ge=0)
    device: str = "auto"
    batch_members: int = option(1024, ge=1)  # weight vectors evaluated at once
    out: str = ""  # default <zoo>.pairs.parquet beside the zoo

    def check(self):
        if "other_dataset" in self.relations and not self.zoo_b:
            raise UsageError("relation other_dataset needs a second zoo: --zoo-b B.h5 (member i of each is a pair)")
