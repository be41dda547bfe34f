"""Can mergeability be predicted from weights? Probes on a pair table (`python -m pairs.build`): pairwise baselines
(weight cosine, raw and aligned L2, prediction agreement, tether compatibility; each alone and all together)
against probes on embedding pairs (|e_a - e_b| and e_a * e_b from one frozen hyper-representation), for the
merged accuracy (naive, matched), the loss barrier (naive, matched) and "mergeable" (matched accuracy barrier below
`threshold`). Members are split, not pairs: a pair is a test pair when both its members are test members, a
training pair when both are training members, and is left out otherwise (no member on both sides).

    python -m pairs.predict --zoo data/zoos/mnist_cnn_s_hyp.h5            # its pairs and embeddings beside it
Tiny CPU run / no arguments: the default zoo's pair table and embeddings.
Writes table.md and results.csv (R^2 and Kendall tau, or accuracy, with 95 % bootstrap intervals over test pairs)
and barriers.png (the barriers per relation, naive and weight-matched).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.preprocessing import StandardScaler

from hyperrep.embeddings import Embeddings
from probes import score
from zoo import UsageError
from zoo._rng import hash32
from zoo.cli import run_cli
from zoo.io import atomic_path, save_figure

BASELINES = ("cosine", "l2", "l2_matched", "agreement", "tether_compat")
TARGETS = ("naive_avg_acc", "matched_avg_acc", "naive_barrier_loss", "matched_barrier_loss", "mergeable")


def pair_split(pairs: pd.DataFrame, test_fraction: float, seed: int) -> np.ndarray:
    """Per pair: 1 test (both members test), 0 train (both train), -1 left out. Members are drawn by a seeded hash
    of their id, so a member's side does not depend on which pairs exist."""
    import torch
    ids = np.unique(pairs[["member_a", "member_b"]].to_numpy())
    u = hash32(torch.tensor(seed), 7, torch.as_tensor(ids)).double().numpy() / 2**32
    test = dict(zip(ids.tolist(), (u < test_fraction).tolist()))
    a, b = (pairs[c].map(test).to_numpy(bool) for c in ("member_a", "member_b"))
    return np.where(a & b, 1, np.where(~a & ~b, 0, -1))


def features(pairs: pd.DataFrame, emb: Embeddings | None) -> dict[str, np.ndarray]:
    """Feature sets: each pairwise baseline alone, all of them, and the embedding pair."""
    base = [c for c in BASELINES if c in pairs]
    out = {c: pairs[[c]].to_numpy(float) for c in base}
    out["pairwise (all)"] = pairs[base].to_numpy(float)
    if "tether_compat" in base and len(base) > 1:  # what tether compatibility adds beyond the other baselines
        out["pairwise without tether_compat"] = pairs[[c for c in base if c != "tether_compat"]].to_numpy(float)
    if emb is not None:
        ea = emb.embeddings[pairs["member_a"].to_numpy(), pairs["slot_a"].to_numpy()]
        eb = emb.embeddings[pairs["member_b"].to_numpy(), pairs["slot_b"].to_numpy()]
        out["embeddings |ea-eb|, ea*eb"] = np.concatenate([np.abs(ea - eb), ea * eb], 1)
    return out


def predict(pairs: pd.DataFrame, emb: Embeddings | None, threshold: float = 0.05, test_fraction: float = 0.3,
            seed: int = 0, n_boot: int = 200) -> pd.DataFrame:
    pairs = pairs.assign(mergeable=(pairs["matched_barrier_acc"] < threshold).astype(int))
    side = pair_split(pairs, test_fraction, seed)
    tr, te = side == 0, side == 1
    if tr.sum() < 5 or te.sum() < 3:
        raise UsageError(f"only {int(tr.sum())} training and {int(te.sum())} test pairs share no member; pick more "
                         f"pairs (n_per_relation) or raise test_fraction")
    rows = []
    for name, X in features(pairs, emb).items():
        X = StandardScaler().fit(X[tr]).transform(X)
        for target in TARGETS:
            y = pairs[target].to_numpy()
            binary = target == "mergeable"
            if binary and len(np.unique(y[tr])) < 2:
                continue
            model = LogisticRegression(max_iter=500) if binary else RidgeCV(alphas=np.logspace(-3, 3, 13))
            pred = model.fit(X[tr], y[tr]).predict(X[te])
            m = score("categorical" if binary else "continuous", y[te], pred, np.flatnonzero(te), n_boot, seed)
            rows.append({"features": name, "target": target, **m})
    return pd.DataFrame(rows)


def markdown(results: pd.DataFrame) -> str:
    cell = lambda r, k: f"{r[k]:.3f} [{r[k + '_lo']:.3f}, {r[k + '_hi']:.3f}]" if k in r and pd.notna(r[k]) else "-"
    lines = ["| features | target | R² | Kendall τ | accuracy |", "|---|---|---|---|---|"]
    for _, r in results.iterrows():
        lines.append(f"| {r['features']} | {r['target']} | {cell(r, 'r2')} | {cell(r, 'kendall_tau')} | "
                     f"{cell(r, 'accuracy')} |")
    return "\n".join(lines) + "\n"


def plot_barriers(pairs: pd.DataFrame, path: Path) -> Path:
    """Box plots of the loss and accuracy barriers per relation, naive and after weight matching."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relations = list(dict.fromkeys(pairs["relation"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, metric in zip(axes, ("barrier_loss", "barrier_acc")):
        for j, mode in enumerate(("naive", "matched")):
            vals = [pairs.loc[pairs["relation"] == r, f"{mode}_{metric}"].to_numpy() for r in relations]
            pos = np.arange(len(relations)) + (j - 0.5) * 0.35
            box = ax.boxplot(vals, positions=pos, widths=0.3, patch_artist=True, showfliers=False)
            for patch in box["boxes"]:
                patch.set_facecolor(("tab:red", "tab:blue")[j])
            ax.plot([], [], color=("tab:red", "tab:blue")[j], lw=6, label=mode)
        ax.set_xticks(range(len(relations)), [f"{r}\n(n={int((pairs['relation'] == r).sum())})" for r in relations],
                      fontsize=8)
        ax.axhline(0, color="k", lw=0.6)
        ax.set(ylabel=metric.replace("_", " "), title=f"{metric.replace('_', ' ')} along the linear path")
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m pairs.predict", description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", default="data/zoos/digits_default.h5")
    ap.add_argument("--pairs", help="pair table (default <zoo>.pairs.parquet)")
    ap.add_argument("--embeddings", help="embeddings of the zoo (default <zoo>.embeddings.h5 if it exists)")
    ap.add_argument("--threshold", type=float, default=0.05, help="mergeable: matched accuracy barrier below this")
    ap.add_argument("--out", help="directory (default data/pairs/<zoo name>)")
    args = ap.parse_args(argv)
    zoo_path = Path(args.zoo)
    pair_path = Path(args.pairs or zoo_path.with_suffix(".pairs.parquet"))
    if not pair_path.is_file():
        raise UsageError(f"pair table {pair_path} not found; run python -m pairs.build --zoo {zoo_path} first")
    emb_path = Path(args.embeddings or zoo_path.with_suffix(".embeddings.h5"))
    emb = Embeddings.open(emb_path) if (args.embeddings or emb_path.is_file()) else None
    pairs = pd.read_parquet(pair_path)
    results = predict(pairs, emb, args.threshold)
    out = Path(args.out or f"data/pairs/{zoo_path.stem}")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.csv") as tmp:
        results.to_csv(tmp, index=False)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(markdown(results))
    plot_barriers(pairs, out / "barriers.png")
    print(markdown(results) + f"\nwritten to {out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
