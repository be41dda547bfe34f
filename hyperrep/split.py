"""Write the member split a hyperrep fit will use, before it trains, as a probe split file.

    python -m hyperrep.split --config configs/hyperrep/mnist_smallcnn_random.yaml \\
        --zoo data/zoos/mnist_smallcnn_random.h5 --out data/probes/mnist_smallcnn_random.split.json
    python -m probes.evaluate --zoo data/zoos/mnist_smallcnn_random.h5 \\
        split=data/probes/mnist_smallcnn_random.split.json
Tiny CPU run / no arguments: the default zoo and config; writes data/hyperrep/digits_default.split.json.
Probes that need no encoder (W, s(W)) can then run while the encoder fits, on the test members its embeddings
will have. JSON: test_members (union over the zoos), and per zoo its train / val / test member ids.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import zoo
from zoo.cli import UsageError, config_cli, run_cli, to_dict
from zoo.io import atomic_path

from ._fit import fit_splits
from .config import FitConfig
from .embeddings import TEST, TRAIN, VAL


def main(argv: list[str]) -> None:
    cfg, args = config_cli(FitConfig, argv, "python -m hyperrep.split", __doc__, {"zoo": "zoo+", "out": "out"},
                           extra=lambda ap: ap.add_argument("--overwrite", action="store_true"))
    out = Path(cfg.out or f"data/hyperrep/{cfg.name}.split.json")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it")
    _, splits = fit_splits(cfg)
    ids = lambda sp, code: np.flatnonzero(sp == code).tolist()
    record = {"test_members": sorted(set().union(*(ids(sp, TEST) for sp in splits))),
              "zoos": {str(p): {"train": ids(sp, TRAIN), "val": ids(sp, VAL), "test": ids(sp, TEST)}
                       for p, sp in zip(cfg.zoo_paths, splits)},
              "config": to_dict(cfg), "version": zoo.__version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(record))
    print(f"split of {len(record['test_members'])} test members written to {out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
