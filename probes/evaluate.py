"""Probe what weights reveal: linear probes on W, s(W) and hyper-representation embeddings, and
gradient-boosted trees on s(W), with member-level splits and bootstrap confidence intervals.

Full size (after zoo.build, hyperrep.fit and hyperrep.embed on a real zoo):
    python -m probes.evaluate --zoo data/zoos/mnist_cnn_s_seed.h5 --embeddings data/zoos/mnist_cnn_s_seed.embeddings.h5
Dataset probing (several zoos of one architecture):
    python -m probes.evaluate --zoo data/zoos/mnist_smallcnn_random.h5 data/zoos/fashion_mnist_smallcnn_random.h5 \\
        --embeddings A.embeddings.h5 B.embeddings.h5 --targets dataset test_acc
No arguments: the default zoo and its default embeddings, in about a minute on 2 CPU cores.
Any config key (probes/config.py) can also be given as key=value, or in a YAML file with --config.
Cells: R^2 for continuous targets, accuracy for categorical ones, with 95 % bootstrap intervals over test members.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

import zoo
from zoo.cli import UsageError, config_cli, run_cli, to_dict
from zoo.io import atomic_path, output_lock

from ._probe import (
    COLUMNS,
    _default_embeddings,
    evaluate_probes,
    markdown_table,
    plot_embedding_space,
    plot_predictions,
)
from .config import ProbeConfig
from .features import ALL_TARGETS, fit_members_only, load_probe_data, target_kind

FLAGS = {"zoo": "zoo+", "embeddings": "embeddings+", "targets": "targets+", "checkpoints": "checkpoints+",
         "out": "out", "seed": "seed", "test-fraction": "test_fraction", "bootstrap": "bootstrap", "split": "split"}


def _check(cfg: ProbeConfig) -> None:
    unknown = [t for t in cfg.targets if t not in ALL_TARGETS]
    if unknown:
        raise UsageError(f"unknown target '{unknown[0]}'; choose from {', '.join(ALL_TARGETS)}")
    unknown = [t for t in cfg.regress if t not in ALL_TARGETS]
    if unknown:
        raise UsageError(f"unknown target '{unknown[0]}' in regress; choose from {', '.join(ALL_TARGETS)}")
    bad = [c for c in cfg.columns if c not in COLUMNS]
    if bad:
        raise UsageError(f"unknown probe column '{bad[0]}'; choose from {', '.join(map(repr, COLUMNS))}")
    if "dataset" in cfg.targets and len(cfg.zoo) < 2:
        raise UsageError("target 'dataset' needs several zoos (--zoo A.h5 B.h5) of one architecture")
    if len(set(map(os.path.realpath, cfg.zoo))) != len(cfg.zoo):
        raise UsageError("a zoo is listed twice (under two names); list each zoo once")


def _write(out: Path, name: str, text: str) -> None:
    with atomic_path(out / name) as tmp:
        tmp.write_text(text)


def main(argv: list[str]) -> None:
    cfg, args = config_cli(ProbeConfig, argv, "python -m probes.evaluate", __doc__, FLAGS,
                           extra=lambda ap: ap.add_argument("--quiet", action="store_true", help="no progress bar"))
    _check(cfg)
    out = Path(cfg.out or f"data/probes/{Path(cfg.zoo[0]).stem}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} is a file; --out takes a directory")
    embeddings = list(cfg.embeddings) or _default_embeddings(list(cfg.zoo))
    data = load_probe_data(list(cfg.zoo), embeddings, list(cfg.checkpoints) or None, cfg.split or None)
    data = fit_members_only(data) if cfg.members == "fit" else data
    regress = tuple(cfg.regress)
    targets = list(cfg.targets) or [t for t in ALL_TARGETS if t in data.rows and target_kind(data.rows[t], t, regress)]
    with output_lock(out):
        results, predictions, test = evaluate_probes(data, targets, cfg.seed, cfg.test_fraction, cfg.bootstrap,
                                                     progress=not args.quiet, device=cfg.device,
                                                     columns=list(cfg.columns), regress=regress)
        out.mkdir(parents=True, exist_ok=True)
        table = markdown_table(results)
        with atomic_path(out / "results.csv") as tmp:
            results.to_csv(tmp, index=False)
        _write(out, "results.json", json.dumps({"version": zoo.__version__, "config": to_dict(cfg),
                                                "embeddings": embeddings, "results": results.to_dict("records")},
                                               indent=1))
        _write(out, "split.json", json.dumps({"seed": cfg.seed, "test_members": sorted(
            int(m) for m in np.unique(data.rows["member"][test]))}))
        _write(out, "table.md", table + "\n")
        plot_predictions(predictions, results, out)
        plot_embedding_space(data, out / "plots" / "embedding_space.png")
    print(table)
    print(f"\n{len(data.rows)} (member, checkpoint) rows, {int(test.sum())} in the test split; written to {out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
