"""Do decoded networks work? Encode -> decode members of a zoo, load the result into the architecture and
evaluate it with the builder's evaluator (CLI: hyperrep.reconstruct)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import zoo
from zoo import Layout, Permuter, UsageError
from zoo.build import resolve_device
from zoo.io import atomic_path, save_figure

from ._fit import load_run
from .config import ReconstructConfig
from .embeddings import TEST, TRAIN, VAL
from .module import HyperRepModule

KEEP = 0.9  # a reconstruction "works" when it keeps this fraction of the original's test accuracy


def check_compatible(z: zoo.Zoo, meta: dict, run) -> None:
    """The run must have been fitted on members of this zoo's architecture (the same layout)."""
    if z.layout != Layout.from_json(meta["layout"]):
        raise UsageError(f"{run} was fitted on another architecture ({meta.get('architecture')}) than {z.path} "
                         f"({z.architecture}); fit a hyper-representation on this architecture first")


def run_split(z: zoo.Zoo, meta: dict) -> np.ndarray | None:
    """The run's member split of this zoo when the run was fitted on it (the same file and build), else None."""
    for k, entry in enumerate(meta.get("zoos") or [{"path": meta["zoo"], "build_id": meta.get("zoo_build_id")}]):
        same = (entry.get("build_id") and entry["build_id"] == z.build_id) or \
            (not entry.get("build_id") and Path(entry["path"]).resolve() == z.path.resolve())
        splits = meta.get("splits") or [meta["split"]]
        if same and k < len(splits) and len(splits[k]) == z.n_models:
            return np.asarray(splits[k])
    return None


def select_members(z: zoo.Zoo, meta: dict, which: str, slots: list[int]) -> np.ndarray:
    """Member ids: the run's train / val / test members of this zoo, or every usable member ("all")."""
    usable = z.usable(slots)
    if which == "all":
        return np.flatnonzero(usable)
    split = run_split(z, meta)
    if split is None:
        raise UsageError(f"the run was fitted on {meta['zoo']}, not on {z.path}: its {which} members are unknown "
                         f"here; pass members=all")
    code = {"train": TRAIN, "val": VAL, "test": TEST}[which]
    return np.flatnonzero((split == code) & usable)


def resolve_slots(requested, z: zoo.Zoo, default: list[int]) -> list[int]:
    slots = [s % z.n_checkpoints if -z.n_checkpoints <= s < z.n_checkpoints else None for s in (requested or default)]
    if None in slots:
        raise UsageError(f"checkpoint slots {list(requested)} out of range: the zoo has slots 0..{z.n_checkpoints - 1}")
    return sorted(set(slots))


def batched(fn, W: np.ndarray, batch: int, device) -> np.ndarray:
    """fn applied to (batch, P) slices of W on `device`, results stacked on the CPU."""
    out = [fn(torch.from_numpy(W[a:a + batch]).to(device)).cpu().numpy() for a in range(0, len(W), batch)]
    return np.concatenate(out) if out else np.zeros_like(W)


def layer_nmse(module: HyperRepModule, W: np.ndarray, W_hat: np.ndarray, layout: Layout) -> np.ndarray:
    """(n, n_tensors): mean squared error of each tensor in the run's normalised units (per-tensor std)."""
    std = module.std.cpu().numpy()
    err = ((W_hat - W) / std) ** 2
    return np.stack([err[:, e.slice].mean(1) for e in layout], 1)


def _permuted(W: np.ndarray, permuter: Permuter, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return np.stack([w[permuter.random_index(g).numpy()] for w in W])


def reconstruct_slot(module, z: zoo.Zoo, data, members: np.ndarray, slot: int, cfg: ReconstructConfig,
                     device) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-member rows (original / reconstructed accuracy, ...) and per-tensor NMSE for one checkpoint slot."""
    W = z.weight_rows(members, slot)
    acts = [z.activations()[m] for m in members]
    subsets = list(z.field("class_subset")[members])  # each member on its own classes, as the build measured it
    W_hat = batched(module.reconstruct, W, cfg.batch_size, device)
    orig = zoo.evaluate(z.spec, W, data, acts, class_subsets=subsets)
    rec = zoo.evaluate(z.spec, W_hat, data, acts, class_subsets=subsets)
    rows = pd.DataFrame({"member": members, "slot": slot, "epoch": int(z.epochs[slot]),
                         "original_acc": orig["test_acc"], "reconstructed_acc": rec["test_acc"],
                         "original_loss": orig["test_loss"], "reconstructed_loss": rec["test_loss"]})
    rows["keeps_90"] = rows["reconstructed_acc"] >= KEEP * rows["original_acc"]
    if cfg.permutation_check:
        permuter = Permuter.of(z.spec)
        W_perm = _permuted(W, permuter, cfg.seed + slot)
        rows["permuted_reconstructed_acc"] = zoo.evaluate(z.spec, batched(module.reconstruct, W_perm, cfg.batch_size,
                                                                          device), data, acts,
                                                           class_subsets=subsets)["test_acc"]
    return rows, layer_nmse(module, W, W_hat, z.layout)


def summarize(rows: pd.DataFrame, seed: int) -> dict:
    """One slot's summary: accuracies, the fraction that keeps 90 %, and the invariance check (the
    reconstructions of W and pi(W) against reconstructions of two different members)."""
    rec = rows["reconstructed_acc"].to_numpy()
    out = {"slot": int(rows["slot"].iloc[0]), "epoch": int(rows["epoch"].iloc[0]), "members": len(rows),
           "original_mean": rows["original_acc"].mean(), "original_median": rows["original_acc"].median(),
           "reconstructed_mean": rows["reconstructed_acc"].mean(),
           "reconstructed_median": rows["reconstructed_acc"].median(), "keeps_90": rows["keeps_90"].mean()}
    if "permuted_reconstructed_acc" in rows:
        out["delta_permuted"] = np.nanmean(np.abs(rows["permuted_reconstructed_acc"].to_numpy() - rec))
        other = np.roll(np.random.default_rng(seed).permutation(len(rec)), 1)  # a pairing of different members
        out["delta_between_members"] = np.nanmean(np.abs(rec[other] - rec)) if len(rec) > 1 else np.nan
    return out


def reconstruct_zoo(cfg: ReconstructConfig, progress: bool = True) -> Path:
    device = resolve_device(cfg.device)
    out = Path(cfg.out or f"data/reconstruct/{Path(cfg.model).name}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} is a file; pass a directory")
    module, meta = load_run(cfg.model, str(device))
    with zoo.open(cfg.zoo) as z:
        check_compatible(z, meta, cfg.model)
        slots = resolve_slots(cfg.checkpoints, z, meta["slots"][-1:])
        members = select_members(z, meta, cfg.members, slots)
        if cfg.max_members:
            members = members[:cfg.max_members]
        if not len(members):
            raise UsageError(f"no usable {cfg.members} members in {z.path}")
        data = z.dataset(device=str(device))
        rows, nmse = [], []
        for slot in tqdm(slots, desc="reconstructing", unit="checkpoint", disable=not progress):
            r, e = reconstruct_slot(module, z, data, members, slot, cfg, device)
            rows.append(r)
            nmse.append(pd.DataFrame(e, columns=z.layout.names).assign(slot=slot))
        _write(out, pd.concat(rows, ignore_index=True), pd.concat(nmse, ignore_index=True), cfg, z)
    return out


def table(summary: pd.DataFrame, layers: pd.DataFrame) -> str:
    lines = ["| epoch | members | original acc mean / median | reconstructed mean / median | keeps >= 90 % | "
             "normalised MSE | mean abs acc change, rec(pi W) vs rec(W) | same, between two members |",
             "|---|---|---|---|---|---|---|---|"]
    for _, s in summary.iterrows():
        nmse = layers[layers["slot"] == s["slot"]].drop(columns="slot").to_numpy().mean()
        inv = (f"{s['delta_permuted']:.4f} | {s['delta_between_members']:.4f}" if "delta_permuted" in s
               else "- | -")
        lines.append(f"| {int(s['epoch'])} | {int(s['members'])} | {s['original_mean']:.4f} / "
                     f"{s['original_median']:.4f} | {s['reconstructed_mean']:.4f} / {s['reconstructed_median']:.4f} | "
                     f"{s['keeps_90']:.3f} | {nmse:.4f} | {inv} |")
    return "\n".join(lines)


def _write(out: Path, rows: pd.DataFrame, nmse: pd.DataFrame, cfg: ReconstructConfig, z: zoo.Zoo) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = pd.DataFrame([summarize(g, cfg.seed) for _, g in rows.groupby("slot")])
    layers = nmse.groupby("slot").mean().reset_index()
    for name, df in (("results.csv", rows), ("summary.csv", summary), ("layers.csv", layers)):
        with atomic_path(out / name) as tmp:
            df.to_csv(tmp, index=False)
    text = table(summary, layers)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(f"Reconstruction of {z.path} with {cfg.model} (weightzoo {zoo.__version__})\n\n{text}\n")
    plot_scatter(rows, out / "scatter.png")
    print(text)


def plot_scatter(rows: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4))
    for _, g in rows.groupby("slot"):
        ax.scatter(g["original_acc"], g["reconstructed_acc"], s=8, alpha=0.6, label=f"epoch {int(g['epoch'].iloc[0])}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot([0, 1], [0, KEEP], ":", color="gray", lw=0.8, label="90 % kept")
    ax.set(xlabel="original test accuracy", ylabel="reconstructed test accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    save_figure(fig, path)
