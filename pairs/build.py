"""Which members can be merged? Pick pairs of a zoo's members with known relations (other data order, other init, other
hyperparameters, two checkpoints of one run, the twin member of another dataset's zoo) and measure, batched
with the zoo's evaluator: the accuracy and loss of the naive average and of the average after weight matching,
and the loss / accuracy barrier along the linear path (`alphas` points). Writes `<zoo>.pairs.parquet`.

Full size (one GPU): python -m pairs.build --zoo data/zoos/mnist_cnn_s_hyp.h5 n_per_relation=1000
Tiny CPU run / no arguments: the default zoo (data/zoos/digits_default.h5), 64 pairs per relation.
"""
from __future__ import annotations

from zoo.cli import config_cli, run_cli

from ._pairs import pair_table
from .config import PairsConfig


def main(argv: list[str]) -> None:
    cfg, args = config_cli(PairsConfig, argv, "python -m pairs.build", __doc__,
                           {"zoo": "zoo", "zoo-b": "zoo_b", "out": "out", "relations": "relations+"},
                           extra=lambda ap: ap.add_argument("--quiet", action="store_true"))
    out = pair_table(cfg, progress=not args.quiet)
    print(f"pair table written to {out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
