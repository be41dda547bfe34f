"""Do decoded networks work? Encode and decode the test members of a zoo with a fitted hyper-representation,
evaluate originals and reconstructions with the builder's evaluator, and check permutation invariance.

Full size (one GPU): python -m hyperrep.reconstruct --zoo data/zoos/mnist_cnn_s_seed.h5 \\
                         --model data/hyperrep/mnist_cnn_s_seed checkpoints=[1,5,25,50]
Tiny CPU run / no arguments: the default zoo and run (data/zoos/digits_default.h5, data/hyperrep/digits_default).
Writes table.md, results.csv (per member and checkpoint), summary.csv, layers.csv (normalised MSE per tensor)
and scatter.png (original vs reconstructed accuracy) to data/reconstruct/<run name>/.
"""
from __future__ import annotations

from zoo.cli import config_cli, run_cli

from ._reconstruct import reconstruct_zoo
from .config import ReconstructConfig


def main(argv: list[str]) -> None:
    cfg, args = config_cli(ReconstructConfig, argv, "python -m hyperrep.reconstruct", __doc__,
                           {"zoo": "zoo", "model": "model", "out": "out", "device": "device"},
                           extra=lambda ap: ap.add_argument("--quiet", action="store_true"))
    out = reconstruct_zoo(cfg, progress=not args.quiet)
    print(f"reconstruction results written to {out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
