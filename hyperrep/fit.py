"""Learn a hyper-representation (SANE-style autoencoder) of a zoo's weights, with Lightning.

Full size, one GPU (SANE CNN size on the Model Zoos MNIST seed zoo):
    python -m hyperrep.fit --zoo data/zoos/mnist_cnn_s_seed.h5 --config configs/hyperrep/mnist_cnn_s_seed.yaml
Several GPUs (DDP):  ... devices=4
Tiny CPU run:  python -m hyperrep.fit epochs=1 d_model=32 --out /tmp/hr
No arguments: fits on the default zoo (data/zoos/digits_default.h5) in about 80 s on 2 CPU cores.
The run directory holds model.pt (weights, normalisation, member split), hyperrep.yaml (config, layout,
metrics), logs/ (CSV) and loss.png; an interrupted fit resumes from checkpoints/last.ckpt.
"""
from __future__ import annotations

import argparse

from zoo.cli import load_config, run_cli

from ._fit import fit_run
from .config import FitConfig


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m hyperrep.fit", description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", help="zoo .h5 (default data/zoos/digits_default.h5)")
    ap.add_argument("--config", help="YAML config (configs/hyperrep/*.yaml)")
    ap.add_argument("--out", help="run directory (default data/hyperrep/<name>)")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. epochs=5 d_model=128")
    args = ap.parse_intermixed_args(argv)
    extra = [f"zoo={args.zoo}"] * bool(args.zoo) + [f"out={args.out}"] * bool(args.out)
    cfg = load_config(FitConfig, args.config, list(args.overrides) + extra)
    out = fit_run(cfg, args.overwrite)
    if out is not None:
        print(f"hyper-representation written to {out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
