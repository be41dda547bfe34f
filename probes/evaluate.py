"""Probe what weights reveal: linear probes on W, s(W) and hyper-representation embeddings, and
gradient-boosted trees on s(W), with member-level splits and bootstrap confidence intervals.

Full size (after zoo.build, hyperrep.fit and hyperrep.embed on a real zoo):
    python -m probes.evaluate --zoo data/zoos/mnist_cnn_s_seed.h5 --embeddings data/zoos/mnist_cnn_s_seed.embeddings.h5
Dataset probing (several zoos of one architecture):
    python -m probes.evaluate --zoo data/zoos/mnist_cnn_gap_random.h5 data/zoos/fashion_mnist_cnn_gap_random.h5 \\
        --embeddings A.embeddings.h5 B.embeddings.h5 --targets dataset test_acc
No arguments: the default zoo and its default embeddings, in well under a minute on 2 CPU cores.
Cells: R^2 for continuous targets, accuracy for categorical ones, with 95 % bootstrap intervals over test members.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import zoo
from zoo.cli import UsageError, run_cli

from ._probe import _default_embeddings, evaluate_probes, markdown_table, plot_predictions
from .features import ALL_TARGETS, load_probe_data, target_kind


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m probes.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", nargs="+", default=["data/zoos/digits_default.h5"])
    ap.add_argument("--embeddings", nargs="+", help="one per zoo (default: <zoo>.embeddings.h5 where present)")
    ap.add_argument("--targets", nargs="+", help=f"default: every one that varies, of {', '.join(ALL_TARGETS)}")
    ap.add_argument("--checkpoints", nargs="+", type=int, help="checkpoint slots to use (default all)")
    ap.add_argument("--out", help="output directory (default data/probes/<first zoo name>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--bootstrap", type=int, default=200)
    args = ap.parse_args(argv)
    unknown = [t for t in args.targets or [] if t not in ALL_TARGETS]
    if unknown:
        raise UsageError(f"unknown target '{unknown[0]}'; choose from {', '.join(ALL_TARGETS)}")
    if args.targets and "dataset" in args.targets and len(args.zoo) < 2:
        raise UsageError("target 'dataset' needs several zoos (--zoo A.h5 B.h5) of one architecture")
    data = load_probe_data(args.zoo, args.embeddings or _default_embeddings(args.zoo), args.checkpoints)
    targets = args.targets or [t for t in ALL_TARGETS if t in data.rows and target_kind(data.rows[t], t)]
    results, predictions, test = evaluate_probes(data, targets, args.seed, args.test_fraction, args.bootstrap)
    out = Path(args.out or f"data/probes/{Path(args.zoo[0]).stem}")
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    results.to_csv(out / "results.csv", index=False)
    (out / "results.json").write_text(json.dumps({"version": zoo.__version__, "zoos": args.zoo,
                                                  "embeddings": args.embeddings or _default_embeddings(args.zoo),
                                                  "seed": args.seed, "results": results.to_dict("records")}, indent=1))
    (out / "split.json").write_text(json.dumps({"seed": args.seed, "test_members": sorted(
        int(m) for m in np.unique(data.rows["member"][test]))}))
    (out / "table.md").write_text(table + "\n")
    plot_predictions(predictions, results, out)
    print(table)
    print(f"\n{len(data.rows)} (member, checkpoint) rows, {int(test.sum())} in the test split; written to {out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
