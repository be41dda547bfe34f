"""Learn a hyper-representation (SANE-style autoencoder) of a zoo's weights, with Lightning.

Full size, one GPU (SANE CNN size on the Model Zoos MNIST seed zoo):
    python -m hyperrep.fit --zoo data/zoos/mnist_cnn_s_seed.h5 --config configs/hyperrep/mnist_cnn_s_seed.yaml
Several GPUs (DDP):  ... devices=4
One encoder for several zoos of one architecture:  python -m hyperrep.fit --zoo A.h5 B.h5 --out data/hyperrep/ab
Tiny CPU run:  python -m hyperrep.fit epochs=1 d_model=32 --out /tmp/hr
No arguments: fits on the default zoo (data/zoos/digits_default.h5) in about 80 s on 2 CPU cores.
The run directory holds model.pt (weights, normalisation, member split), hyperrep.yaml (config, layout,
metrics), logs/ (CSV) and loss.png; an interrupted fit resumes from checkpoints/last.ckpt.
"""
from __future__ import annotations

import dataclasses

from zoo.cli import config_cli, run_cli

from ._fit import fit_run
from .config import FitConfig


def main(argv: list[str]) -> None:
    cfg, args = config_cli(FitConfig, argv, "python -m hyperrep.fit", __doc__, {"zoo": "zoo+", "out": "out"},
                           extra=lambda ap: ap.add_argument("--overwrite", action="store_true",
                                                            help="refit: replace the run and its checkpoints"))
    if isinstance(cfg.zoo, tuple) and len(cfg.zoo) == 1:  # --zoo A.h5: one zoo
        cfg = dataclasses.replace(cfg, zoo=cfg.zoo[0])
    out = fit_run(cfg, args.overwrite)
    if out is not None:
        print(f"hyper-representation written to {out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
