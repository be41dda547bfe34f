"""Fitting, exporting and loading hyper-representation runs (CLI: hyperrep.fit)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml

import zoo
from zoo import Layout, ModelSpec, Permuter, UsageError, load_config
from zoo.cli import read_yaml, to_dict
from zoo.io import atomic_path

from .config import FitConfig
from .data import TRAIN, ZooDataModule, activation_codes, layer_stats, split_members
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
    mean, std = layer_stats(z, np.flatnonzero(split == TRAIN), slots, per_layer=cfg.normalize == "layer")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = HyperRepModule(cfg, z.layout, mean, std, z.spec)
    codes, names = activation_codes(z.field("activation"))
    module.activations = names
    if cfg.beta > 0:
        _set_probe(module, z, cfg, names)
    permuter = Permuter.of(z.spec) if cfg.permute or cfg.align else None
    reference = torch.from_numpy(z.weights(int(np.flatnonzero(split == TRAIN)[0]), slots[-1])) if cfg.align else None
    dm = ZooDataModule(str(z.path), split, slots, cfg.batch_size, cfg.num_workers, permuter, cfg.permute, reference,
                       codes)
    out.mkdir(parents=True, exist_ok=True)
    last = out / "checkpoints" / "last.ckpt"
    if overwrite and last.exists():
        last.unlink()
    trainer = _trainer(cfg, out)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|num_workers|LeafSpec|"
                                                  "exists and is not empty).*")
        trainer.fit(module, dm, ckpt_path=str(last) if last.exists() else None)
    if trainer.interrupted:
        raise UsageError(f"fit interrupted; rerun the same command to resume from {last}")
    if trainer.global_rank != 0:
        return None
    _export(out, module, cfg, z, split, slots, trainer)
    return out


def _set_probe(module: HyperRepModule, z: zoo.Zoo, cfg: FitConfig, names: list[str]) -> None:
    """The functional loss's probe images: a seeded sample of the zoo's training images (never test images)."""
    data = z.dataset()
    idx = np.sort(np.random.default_rng(cfg.seed).permutation(len(data.y_train))[:cfg.probe_images])
    module.set_probe(data.x_train[torch.from_numpy(idx)], data.mean, data.std, names)


RUN_FORMAT = "weightzoo-hyperrep/1"


def _export(out: Path, module: HyperRepModule, cfg: FitConfig, z: zoo.Zoo, split, slots, trainer) -> None:
    """model.pt (weights, split, and the run's metadata as YAML text) is the run's one commit point;
    hyperrep.yaml beside it is a readable copy of the metadata."""
    meta = {"format": RUN_FORMAT, "version": zoo.__version__, "config": to_dict(cfg), "zoo": str(z.path),
            "zoo_build_id": z.build_id, "architecture": z.architecture, "spec": z.spec.to_attrs(),
            "layout": z.layout.to_json(), "n_tokens": module.tokenizer.n_tokens, "activations": module.activations,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    text = yaml.safe_dump(meta, sort_keys=False)
    blob = {"state_dict": module.state_dict(), "split": torch.from_numpy(split), "slots": torch.tensor(slots),
            "meta": text}
    with atomic_path(out / "model.pt") as tmp:
        torch.save(blob, tmp)
    with atomic_path(out / "hyperrep.yaml") as tmp:
        tmp.write_text(text)
    plot_losses(out)


def _read_run(run: Path) -> tuple[dict, dict]:
    """(blob, meta) of a run's model.pt, loaded with weights_only=True; damage is one clear line."""
    try:
        blob = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated, foreign or pickled-code file
        raise UsageError(f"{run / 'model.pt'} is not a readable hyperrep model ({type(e).__name__}); "
                         f"refit it with python -m hyperrep.fit --overwrite") from None
    if not isinstance(blob, dict) or not {"state_dict", "split", "slots"} <= set(blob):
        raise UsageError(f"{run / 'model.pt'} is not a weightzoo hyperrep model (missing state_dict/split/slots)")
    text = blob.get("meta")
    if text is None:  # runs written before the metadata moved into model.pt
        text = read_yaml(run / "hyperrep.yaml", "run metadata")
    meta = yaml.safe_load(text) if isinstance(text, str) else text
    if not isinstance(meta, dict) or not {"config", "layout"} <= set(meta):
        raise UsageError(f"{run} has no readable run metadata (config, layout); refit it")
    return blob, meta


def load_run(run: str | Path, device: str = "cpu") -> tuple[HyperRepModule, dict]:
    """A fitted run directory -> (module in eval mode, metadata)."""
    run = Path(run)
    if not (run / "model.pt").is_file():
        raise UsageError(f"{run} is not a fitted hyperrep run (no model.pt); run python -m hyperrep.fit")
    blob, meta = _read_run(run)
    cfg = load_config(FitConfig, None, [], meta["config"])
    sd = blob["state_dict"]
    spec = ModelSpec.from_attrs(meta["spec"]) if "spec" in meta else None
    module = HyperRepModule(cfg, Layout.from_json(meta["layout"]), sd["mean"], sd["std"], spec)
    try:
        module.load_state_dict(sd)
    except RuntimeError as e:
        raise UsageError(f"{run / 'model.pt'} does not match its config ({str(e).splitlines()[0]})") from None
    module.activations = list(meta.get("activations", []))
    meta["split"], meta["slots"] = blob["split"].numpy(), blob["slots"].tolist()
    return module.to(device).eval(), meta
