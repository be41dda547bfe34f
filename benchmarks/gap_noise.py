"""How much of a zoo's generalisation gap is sampling noise: the ceiling it puts on any probe's gap R².

Each member's gap (train_acc - test_acc) is two accuracy estimates, each a mean over a finite evaluation set, so
it carries binomial noise of variance p(1 - p) / n per term. The train term is measured on the member's own pool
among `train_pool` training samples (`zoo.build train_eval_samples`, or the whole training set when 0), about
train_fraction x train_pool of them; the test term on `test` samples. A probe cannot predict that noise from the
weights, so R² of the gap is bounded by 1 - (mean noise variance) / (gap variance). Diverged members are left out.

    python benchmarks/gap_noise.py benchmarks/results/h200_s12_zoo_n3000_e12/mnist_smallcnn_random_n3000_e12.parquet \
        --train-pool 10000 --test 10000 --out gap_noise.md       # the 12-epoch smallcnn zoo (FULL_ZOO.md)
    python benchmarks/gap_noise.py --zoo data/zoos/NAME.h5 --out gap_noise.md
        # sizes from the zoo: its config's train_eval_samples and its dataset's splits (full_zoo_smallcnn.sh)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

NEEDED = ("epoch", "train_acc", "test_acc", "train_fraction", "diverged")


def noise_table(t: pd.DataFrame, train_pool: int, test: int) -> pd.DataFrame:
    """One row per epoch and one for all rows pooled (what the probes regress): gap variance, the expected
    sampling variance, its share and the R² ceiling it leaves."""
    t = t[~t["diverged"].astype(bool)]
    gap = t["train_acc"] - t["test_acc"]
    n_train = np.maximum(t["train_fraction"] * train_pool, 1.0)  # the member's own samples among the pool
    noise = (t["train_acc"] * (1 - t["train_acc"]) / n_train + t["test_acc"] * (1 - t["test_acc"]) / test)
    rows = []
    for epoch, idx in [*t.groupby("epoch").groups.items(), ("all", t.index)]:
        var, mean_noise = gap[idx].var(), noise[idx].mean()
        rows.append({"epoch": epoch, "rows": len(idx), "gap std": np.sqrt(var), "gap median": gap[idx].median(),
                     "noise std": np.sqrt(mean_noise), "noise share": mean_noise / var,
                     "R² ceiling": max(0.0, 1 - mean_noise / var)})
    return pd.DataFrame(rows)


def sizes_from_zoo(path: str) -> tuple[pd.DataFrame, int, int]:
    """A zoo's table, the training samples its train metrics were drawn from and its test split's size."""
    from zoo import open_zoo
    with open_zoo(path) as z:
        data, table = z.dataset(), z.table.to_pandas()
        every = int(z.config.get("train_eval_samples", 0))
    n_train = len(data.y_train)
    return table, (every if 0 < every < n_train else n_train), len(data.y_test)


def to_markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        cells = [str(r[c]) if c in ("epoch", "rows") else f"{r[c]:.4f}" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("table", nargs="?", help="a zoo's Parquet table (zoo.build writes it beside the .h5)")
    ap.add_argument("--zoo", help="instead: a zoo (.h5), whose config and dataset give the sizes")
    ap.add_argument("--train-pool", type=int,
                    help="training samples the train metrics are drawn from (train_eval_samples, or the train size)")
    ap.add_argument("--test", type=int, help="test samples behind test_acc")
    ap.add_argument("--out", help="also write the table here (markdown)")
    args = ap.parse_args(argv)
    if args.zoo:
        if args.table or args.train_pool or args.test:
            ap.error("--zoo takes its table and sizes from the zoo: pass no table, --train-pool or --test with it")
        if not Path(args.zoo).is_file():
            ap.error(f"no zoo at {args.zoo}: pass the .h5 that zoo.build wrote")
        t, args.train_pool, args.test = sizes_from_zoo(args.zoo)
        args.table = args.zoo
    else:
        if not args.table or not args.train_pool or not args.test:
            ap.error("pass a zoo table with --train-pool N --test N (both >= 1), or --zoo ZOO.h5")
        if not Path(args.table).is_file():
            ap.error(f"no zoo table at {args.table}: pass the .parquet that zoo.build wrote beside the zoo")
        t = pd.read_parquet(args.table)
    if args.train_pool < 1 or args.test < 1:
        ap.error(f"--train-pool and --test must be >= 1, got {args.train_pool} and {args.test}")
    missing = [c for c in NEEDED if c not in t]
    if missing:
        ap.error(f"{args.table} lacks column(s) {', '.join(missing)}: a zoo table with train metrics is needed")
    if "class_subset" in t and t["class_subset"].map(len).any():
        ap.error(f"{args.table} has members with a class_subset: their pools are not train_fraction x train_pool")
    md = to_markdown(noise_table(t, args.train_pool, args.test))
    print(md, end="")
    if args.out:
        tmp = Path(f"{args.out}.tmp")
        tmp.write_text(md)
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
