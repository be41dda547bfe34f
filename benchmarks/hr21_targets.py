"""The full-size zoo's target table: embedding probes against HR21's MNIST-HYP R² and the weight baselines.
Reads probes.evaluate output directories (one per fit or probe run on the same test members) and writes, per
target, the best embedding cell over every run (column and run named), s(W) linear and s(W) gbm, whether HR21's
number is met and whether the embedding is >= s(W) linear ("overlap" when the intervals overlap either way).

    python benchmarks/hr21_targets.py pipeline=OUT/probes_emb long=RUN/probes base=OUT/probes_base --out targets.md
`benchmarks/full_zoo_smallcnn.sh` calls it on its two probe folders.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

# R² of embedding linear probes on HR21's MNIST-HYP zoo (Schürholt et al., 2021, as issue 18 quotes them)
HR21 = {"test_acc": 0.949, "epoch": 0.50, "gen_gap": 0.274, "lr": 0.371, "dropout": 0.358, "train_fraction": 0.159}
KENDALL_STATNN = 0.915  # Unterthiner et al., StatNN on CIFAR10-GS: Kendall's tau of predicted test accuracy
BASELINES = ("s(W) linear", "s(W) gbm")


def load(runs: list[str]) -> pd.DataFrame:
    """Long table (run, target, column, metric, value, lo, hi) of R² cells and test accuracy's Kendall tau."""
    frames = []
    for item in runs:
        name, _, path = item.partition("=")
        if not name or not (Path(path) / "results.csv").is_file():
            raise SystemExit(f"expected NAME=DIR with DIR/results.csv (probes.evaluate --out DIR), got {item!r}")
        t = pd.read_csv(Path(path) / "results.csv")
        t = t[t["kind"] == "continuous"]
        for metric in ("r2", "kendall_tau"):
            if metric not in t:
                continue
            rows = t if metric == "r2" else t[t["target"] == "test_acc"]
            frames.append(pd.DataFrame({"run": name, "target": rows["target"], "column": rows["column"],
                                        "metric": metric, "value": rows[metric], "lo": rows[f"{metric}_lo"],
                                        "hi": rows[f"{metric}_hi"]}))
    return pd.concat(frames, ignore_index=True).dropna(subset=["value"])


def versus(emb: pd.Series, base: pd.Series | None) -> str:
    if base is None:
        return "-"
    if emb["lo"] > base["hi"] or emb["hi"] < base["lo"]:
        return "yes" if emb["value"] > base["value"] else "no"
    return f"{'yes' if emb['value'] >= base['value'] else 'no'} (intervals overlap)"


def cell(r: pd.Series | None, where: bool = False) -> str:
    if r is None:
        return "-"
    text = f"{r['value']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"
    return f"**{text}** ({r['column'].removesuffix(' linear')}, {r['run']})" if where else f"{r['value']:.3f}"


def table(cells: pd.DataFrame) -> str:
    lines = ["| target | HR21 | best embedding (column, run) | s(W) linear | s(W) gbm | HR21 met | >= s(W) linear |",
             "|---|---|---|---|---|---|---|"]
    rows = [(t, "r2", HR21[t]) for t in HR21] + [("test_acc", "kendall_tau", KENDALL_STATNN)]
    for target, metric, ref in rows:
        sub = cells[(cells["target"] == target) & (cells["metric"] == metric)]
        emb = sub[sub["column"].str.startswith("emb")]
        if emb.empty:
            continue
        best = emb.loc[emb["value"].idxmax()]
        base = {c: (sub[sub["column"] == c].iloc[0] if (sub["column"] == c).any() else None) for c in BASELINES}
        name = target if metric == "r2" else "test_acc (Kendall τ; StatNN on CIFAR10-GS)"
        lines.append(f"| {name} | {ref} | {cell(best, True)} | {cell(base['s(W) linear'])} | "
                     f"{cell(base['s(W) gbm'])} | {'yes' if best['value'] >= ref else 'no'} | "
                     f"{versus(best, base['s(W) linear'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="NAME=DIR: a probes.evaluate output folder")
    ap.add_argument("--out", type=Path, help="write the markdown table here (default: print only)")
    args = ap.parse_args(argv)
    text = table(load(args.runs))
    print(text, end="")
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
