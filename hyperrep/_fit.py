"""Fitting, exporting and loading hyper-representation runs (CLI: hyperrep.fit)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml

import zoo
from zoo import Layout, Permuter, UsageError, load_config
from zoo.cli import to_dict

from .config import FitConfig
from .data import TRAIN, ZooDataModule, layer_stats, split_members
from .module import HyperRepModule


def _slots(cfg: FitConfig, z: zoo.Zoo) -> list[int]:
    slots = list(cfg.checkpoints) or list(range(z.n_checkpoints))
    bad = [s for s in slots if not 0 <= s < z.n_checkpoints]
    if bad:
        raise UsageError(f"checkpoints {bad} out of range: the zoo has slots 0..{z.n_checkpoints - 1}")
    return slots


def _trainer(cfg: FitConfig, out: Path) -> L.Trainer:
    gpu = cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    precision = cfg.precision if cfg.precision != "auto" else ("bf16-mixed" if gpu else "32-true")
    return L.Trainer(
        max_epochs=cfg.epochs, max_steps=cfg.max_steps, accelerator=cfg.accelerator, devices=cfg.devices,
        strategy="ddp" if cfg.devices > 1 else "auto", precision=precision,
        logger=L.pytorch.loggers.CSVLogger(out, name="logs"), log_every_n_steps=1,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=1,
                                                     every_n_epochs=1)],
        enable_model_summary=False, enable_progress_bar=os.environ.get("WEIGHTZOO_QUIET") is None)


def plot_losses(out: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    logs = sorted(out.glob("logs/version_*/metrics.csv"))
    if not logs:
        return None
    df = pd.concat(pd.read_csv(p) for p in logs)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for col in ("train_loss", "val_loss", "train_mse", "val_mse"):
        if col in df:
            d = df[["epoch", col]].dropna()
            ax.plot(d["epoch"], d[col], label=col, ls="-" if "loss" in col else "--")
    ax.set(xlabel="epoch", ylabel="loss", yscale="log", title=out.name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    return out / "loss.png"


def fit_run(cfg: FitConfig, overwrite: bool = False) -> Path | None:
    """Fit and export a run; returns its directory (None on DDP ranks other than 0)."""
    z = zoo.open_zoo(cfg.zoo)
    out = Path(cfg.out or f"data/hyperrep/{cfg.name}")
    if (out / "model.pt").exists() and not overwrite:
        raise UsageError(f"{out / 'model.pt'} already exists; pass --overwrite to refit or choose another --out")
    slots = _slots(cfg, z)
    split = split_members(z.usable(slots), cfg.splits, cfg.split_seed)
    mean, std = layer_stats(z, np.flatnonzero(split == TRAIN), slots)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = HyperRepModule(cfg, z.layout, mean, std)
    permuter = Permuter.of(z.spec) if cfg.permute or cfg.align else None
    reference = torch.from_numpy(z.weights(int(np.flatnonzero(split == TRAIN)[0]), slots[-1])) if cfg.align else None
    dm = ZooDataModule(str(z.path), split, slots, cfg.batch_size, cfg.num_workers, permuter, cfg.permute, reference)
    out.mkdir(parents=True, exist_ok=True)
    last = out / "checkpoints" / "last.ckpt"
    if overwrite and last.exists():
        last.unlink()
    trainer = _trainer(cfg, out)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|num_workers|LeafSpec|exists and is not empty).*")
        trainer.fit(module, dm, ckpt_path=str(last) if last.exists() else None)
    if trainer.interrupted:
        raise UsageError(f"fit interrupted; rerun the same command to resume from {last}")
    if trainer.global_rank != 0:
        return None
    _export(out, module, cfg, z, split, slots, trainer)
    return out


def _export(out: Path, module: HyperRepModule, cfg: FitConfig, z: zoo.Zoo, split, slots, trainer) -> None:
    tmp = out / "model.pt.tmp"
    torch.save({"state_dict": module.state_dict(), "split": torch.from_numpy(split), "slots": torch.tensor(slots)}, tmp)
    meta = {"format": "weightzoo-hyperrep/1", "version": zoo.__version__, "config": to_dict(cfg),
            "zoo": str(z.path), "architecture": z.architecture, "layout": z.layout.to_json(),
            "n_tokens": module.tokenizer.n_tokens,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    (out / "hyperrep.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    os.replace(tmp, out / "model.pt")
    plot_losses(out)


def load_run(run: str | Path, device: str = "cpu") -> tuple[HyperRepModule, dict]:
    """A fitted run directory -> (module in eval mode, metadata)."""
    run = Path(run)
    if not (run / "model.pt").is_file() or not (run / "hyperrep.yaml").is_file():
        raise UsageError(f"{run} is not a fitted hyperrep run (no model.pt / hyperrep.yaml); run python -m hyperrep.fit")
    meta = yaml.safe_load((run / "hyperrep.yaml").read_text())
    cfg = load_config(FitConfig, None, [], meta["config"])
    blob = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    sd = blob["state_dict"]
    module = HyperRepModule(cfg, Layout.from_json(meta["layout"]), sd["mean"], sd["std"])
    module.load_state_dict(sd)
    meta["split"], meta["slots"] = blob["split"].numpy(), blob["slots"].tolist()
    return module.to(device).eval(), meta
