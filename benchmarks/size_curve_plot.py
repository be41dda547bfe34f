"""The zoo-size curve: probe quality of every feature (W, s(W), embeddings) against the number of members the
encoder and the probes saw. Reads the probes.evaluate output directories of one run per size.

    python benchmarks/size_curve_plot.py 1000=data/pipeline_logs/size/n1000 3000=... --out size_curve.png \
        --reference test_acc=0.949 --reference lr=0.371 --reference-label HR21
Writes the figure (one panel per target, R² / accuracy with 95 % intervals, one line per column) and a markdown
table beside it. `benchmarks/zoo_size_curve.sh` runs the sizes and calls this.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

PRIMARY = {"continuous": "r2", "categorical": "accuracy", "multilabel": "mean_balanced_accuracy"}


def load(runs: list[str]) -> pd.DataFrame:
    frames = []
    for item in runs:
        n, _, path = item.partition("=")
        if not n.isdigit() or not (Path(path) / "results.csv").is_file():
            raise SystemExit(f"expected N=DIR with DIR/results.csv (probes.evaluate --out DIR), got {item!r}")
        t = pd.read_csv(Path(path) / "results.csv")
        metric = t["kind"].map(PRIMARY)
        frames.append(pd.DataFrame({"members": int(n), "target": t["target"], "column": t["column"], "metric": metric,
                                    "value": [r[m] for (_, r), m in zip(t.iterrows(), metric)],
                                    "lo": [r[m + "_lo"] for (_, r), m in zip(t.iterrows(), metric)],
                                    "hi": [r[m + "_hi"] for (_, r), m in zip(t.iterrows(), metric)]}))
    return pd.concat(frames, ignore_index=True).sort_values(["target", "column", "members"])


def references(items: list[str]) -> dict[str, float]:
    """{target: value} from TARGET=VALUE items (e.g. HR21's numbers, drawn as dashed lines)."""
    refs = {}
    for item in items:
        target, _, value = item.partition("=")
        try:
            refs[target] = float(value)
        except ValueError:
            raise ValueError(f"--reference expects TARGET=NUMBER, got {item!r}") from None
    return refs


def plot(curve: pd.DataFrame, out: Path, refs: dict[str, float] | None = None, ref_label: str = "reference") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(curve["target"]))
    fig, axes = plt.subplots(1, len(targets), figsize=(3.6 * len(targets), 3.4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        sub = curve[curve["target"] == target]
        for col, g in sub.groupby("column", sort=False):
            ax.plot(g["members"], g["value"], marker="o", label=col)
            ax.fill_between(g["members"], g["lo"], g["hi"], alpha=0.15)
        if target in (refs or {}):
            ax.axhline(refs[target], color="grey", linestyle="--", linewidth=1, label=ref_label)
        ax.set(xscale="log", xlabel="members", ylabel=sub["metric"].iloc[0], title=target)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="N=DIR: probes.evaluate output of the run with N members")
    ap.add_argument("--out", default="size_curve.png")
    ap.add_argument("--reference", action="append", default=[], metavar="TARGET=VALUE",
                    help="a published number to draw as a dashed line (repeatable), e.g. test_acc=0.949")
    ap.add_argument("--reference-label", default="reference", help="its legend entry, e.g. HR21")
    args = ap.parse_args()
    try:
        refs = references(args.reference)
    except ValueError as e:
        ap.error(str(e))  # one line, exit code 2
    curve = load(args.runs)
    out = Path(args.out)
    plot(curve, out, refs, args.reference_label)
    wide = curve.pivot_table(index=["target", "column"], columns="members", values="value", sort=False)
    lines = ["| target | column | " + " | ".join(f"{n} members" for n in wide.columns) + " |",
             "|---|---|" + "---|" * len(wide.columns)]
    lines += [f"| {t} | {c} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for (t, c), row in wide.iterrows()]
    if refs:
        lines += ["", f"{args.reference_label}: " + ", ".join(f"{t} {v:g}" for t, v in refs.items())]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\n\nwritten to {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
