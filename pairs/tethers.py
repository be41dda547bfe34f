"""The training trajectories of a tethered zoo with its tether merges marked: one line per member (a metric over
epochs), a dot where the member's tethers were merged with a partner's (the checkpoint at which its merge count
grew). The zoo must be built with tether merging:

    python -m zoo.build architecture_kwargs.tethered=true tether_merge=true merge_compat=0.9 \\
        "checkpoints=[0,1,2,3,4,5,6,7,8]" --out data/zoos/tethered.h5
    python -m pairs.tethers data/zoos/tethered.h5                       # -> data/zoos/tethered.tethers.png
Tiny CPU run: the tests build a tethered digits zoo (tests/test_pairs.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import zoo
from zoo import UsageError
from zoo.cli import run_cli
from zoo.io import save_figure


def plot_merges(zoo_path: str | Path, out: str | Path | None = None, metric: str = "train_loss",
                max_members: int = 64) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with zoo.open(zoo_path) as z:
        if "tether_merges" not in z.metric_names:
            raise UsageError(f"{zoo_path} has no tether merges (build it with tether_merge=true)")
        values, merges, epochs = z.metric(metric), z.metric("tether_merges"), z.epochs
        members = np.flatnonzero(z.usable())[:max_members]
    out = Path(out or Path(zoo_path).with_suffix(".tethers.png"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in members:
        line, = ax.plot(epochs, values[m], lw=0.8, alpha=0.6)
        grew = np.flatnonzero(np.diff(merges[m], prepend=0) > 0)
        ax.scatter(epochs[grew], values[m, grew], s=18, color=line.get_color(), edgecolor="k", zorder=3)
    ax.set(xlabel="epoch", ylabel=metric, title=f"{Path(zoo_path).stem}: {len(members)} members, dots = tether merges")
    return save_figure(fig, out)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m pairs.tethers", description=__doc__.split("\n")[0])
    ap.add_argument("zoo", nargs="?", default="data/zoos/tethered.h5", help="a zoo built with tether_merge=true")
    ap.add_argument("--out")
    ap.add_argument("--metric", default="train_loss")
    args = ap.parse_args(argv)
    print(f"plot written to {plot_merges(args.zoo, args.out, args.metric)}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
