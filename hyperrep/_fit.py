"""Fitting, exporting and loading hyper-representation runs (CLI: hyperrep.fit)."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml

import zoo
from zoo import Layout, ModelSpec, Permuter, UsageError, load_config
from zoo.cli import read_yaml, to_dict
from zoo.io import atomic_path, output_lock, safe_torch_load, weights_only_loads

from .config import FitConfig
from .data import TRAIN, VAL, ZooDataModule, activation_codes, layer_stats, split_members
from .module import HyperRepModule


def _slots(cfg: FitConfig, z: zoo.Zoo) -> list[int]:
    slots = list(cfg.checkpoints) or list(range(z.n_checkpoints))
    bad = [s for s in slots if not 0 <= s < z.n_checkpoints]
    if bad:
        raise UsageError(f"checkpoints {bad} out of range: the zoo has slots 0..{z.n_checkpoints - 1}")
    return slots


class EpochLines(L.Callback):
    """One line per epoch (losses, seconds, steps/s) instead of a progress bar when stderr is not a terminal,
    so a batch job's log does not fill with carriage-return updates."""

    def on_train_epoch_start(self, trainer, module):
        self.t0, self.step0 = time.perf_counter(), trainer.global_step

    def on_validation_epoch_end(self, trainer, module):
        if trainer.sanity_checking or not hasattr(self, "t0") or trainer.global_rank != 0:
            return
        seconds = time.perf_counter() - self.t0
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith(("loss", "mse", "kl"))}
        text = ", ".join(f"{k} {v:.4f}" for k, v in sorted(m.items()))
        rate = (trainer.global_step - self.step0) / max(seconds, 1e-9)
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {text} ({seconds:.1f} s, {rate:.1f} steps/s)",
              file=sys.stderr, flush=True)


def _loggers(cfg: FitConfig, out: Path) -> list:
    """CSV always (loss.png reads it), TensorBoard / Weights & Biases when asked for and installed."""
    loggers = [L.pytorch.loggers.CSVLogger(out, name="logs")]
    if "tensorboard" in cfg.loggers:
        loggers.append(L.pytorch.loggers.TensorBoardLogger(out, name="tensorboard"))
    if "wandb" in cfg.loggers:
        loggers.append(L.pytorch.loggers.WandbLogger(project="weightzoo", name=cfg.name, save_dir=str(out)))
    return loggers


def _loggers_available(cfg: FitConfig) -> None:
    """Asked-for loggers must be installed (checked before anything is written)."""
    for name, module in (("tensorboard", ("tensorboard", "tensorboardX")), ("wandb", ("wandb",))):
        if name in cfg.loggers and all(importlib.util.find_spec(m) is None for m in module):
            raise UsageError(f"loggers includes {name}, which is not installed: pip install {name}")


def _trainer(cfg: FitConfig, out: Path, steps_per_epoch: int) -> L.Trainer:
    gpu = cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    precision = cfg.precision if cfg.precision != "auto" else ("bf16-mixed" if gpu else "32-true")
    quiet = os.environ.get("WEIGHTZOO_QUIET") is not None
    bar = not quiet and sys.stderr.isatty()
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=1,
                                                     every_n_epochs=1)]
    if not quiet and not bar:
        callbacks.append(EpochLines())
    return L.Trainer(
        max_epochs=cfg.epochs, max_steps=cfg.max_steps,
        max_time=timedelta(minutes=cfg.max_minutes) if cfg.max_minutes > 0 else None,
        accelerator=cfg.accelerator, devices=cfg.devices,
        strategy="ddp" if cfg.devices > 1 else "auto", precision=precision, logger=_loggers(cfg, out),
        log_every_n_steps=max(1, min(cfg.log_every, steps_per_epoch)), callbacks=callbacks,
        enable_model_summary=False, enable_progress_bar=bar)


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


# keys that may differ between a fit and its resume: where it runs, not what it fits
PLACEMENT_KEYS = ("devices", "num_workers", "max_minutes")


def _check_placement(cfg: FitConfig) -> None:
    if cfg.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UsageError(f"accelerator={cfg.accelerator} but no CUDA GPU is visible; use accelerator=cpu or auto")
    gpu = cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if cfg.precision == "16-mixed" and not gpu:
        raise UsageError("precision=16-mixed needs a CUDA GPU; use 32-true or bf16-mixed on the CPU")


def _check_splits(split: np.ndarray, cfg: FitConfig, z: zoo.Zoo) -> None:
    for code, name in ((TRAIN, "train"), (VAL, "val")):
        if not (split == code).any():
            raise UsageError(f"the {name} split of {z.path} is empty ({int((split >= 0).sum())} usable members, "
                             f"splits={list(cfg.splits)}); use a larger zoo or other splits")


def open_zoos(cfg: FitConfig) -> list[zoo.Zoo]:
    """The fit's zoos: one architecture (one layout); each zoo once."""
    paths = cfg.zoo_paths
    resolved = [Path(p).resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        dup = next(p for p, r in zip(paths, resolved) if resolved.count(r) > 1)
        raise UsageError(f"zoo {dup} is listed twice; list each zoo once")
    zs = [zoo.open_zoo(p) for p in paths]
    for z in zs[1:]:
        if z.layout != zs[0].layout:
            raise UsageError(f"{z.path} holds {z.architecture} members of another layout than {zs[0].path} "
                             f"({zs[0].architecture}); one hyper-representation needs one architecture")
    if cfg.beta > 0 and len(zs) > 1:
        raise UsageError("the functional loss (beta > 0) runs members on one dataset's probe images; fit several "
                         "zoos with beta=0")
    return zs


def fingerprint(cfg: FitConfig, zs: list[zoo.Zoo]) -> dict:
    """What a resumed fit must share with the fit that left the checkpoint: its config and its zoos."""
    keys = {k: v for k, v in to_dict(cfg).items() if k not in PLACEMENT_KEYS}
    return {"config": keys, "zoo": ";".join(str(z.path.resolve()) for z in zs),
            "zoo_build_id": ";".join(z.build_id for z in zs)}


def _check_resume(last: Path, cfg: FitConfig, zs: list[zoo.Zoo]) -> None:
    """Resume only from a checkpoint whose fit had this config and zoos; else one line naming the difference."""
    record = last.with_name("fit.yaml")
    if not record.is_file():
        raise UsageError(f"{last} has no record of the fit that wrote it ({record}); pass --overwrite to start again")
    safe_torch_load(last, "fit checkpoint")  # weights-only, before Lightning reads it
    old, new = read_yaml(record, "fit record"), fingerprint(cfg, zs)
    flat = lambda d: {**{f"config.{k}": v for k, v in d["config"].items()}, "zoo": d["zoo"],
                      "zoo_build_id": d["zoo_build_id"]}
    a, b = flat(old), flat(new)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        k = diff[0]
        raise UsageError(f"{last} was left by another fit ({k} was {a.get(k)!r}, now {b.get(k)!r}); rerun that "
                         f"fit's command to resume it, or pass --overwrite to start this one")


def fit_run(cfg: FitConfig, overwrite: bool = False) -> Path | None:
    """Fit and export a run over one or several zoos; returns its directory (None on DDP ranks other than 0).
    Members are split within each zoo; normalisation comes from the training members of all zoos. Everything
    is checked before the run directory or the trainer exist; one fit writes a directory at a time."""
    zs = open_zoos(cfg)
    out = Path(cfg.out or f"data/hyperrep/{cfg.name}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"run directory {out} is a file; choose another --out")
    if (out / "model.pt").exists() and not overwrite:
        raise UsageError(f"{out / 'model.pt'} already exists; pass --overwrite to refit or choose another --out")
    _check_placement(cfg)
    _loggers_available(cfg)
    slots, splits = fit_splits(cfg, zs)
    rank0 = os.environ.get("LOCAL_RANK", "0") == "0"  # Lightning's DDP ranks re-run this command
    with output_lock(out) if rank0 else contextlib.nullcontext():
        return _fit_locked(cfg, zs, out, slots, splits, overwrite, rank0)


def fit_splits(cfg: FitConfig, zs: list[zoo.Zoo] | None = None) -> tuple[list[int], list[np.ndarray]]:
    """(checkpoint slots, int8 split per member of each zoo) that a fit with this config uses; known before it
    trains, so probes that need no encoder can run on the same test members meanwhile (`hyperrep.split`)."""
    zs = open_zoos(cfg) if zs is None else zs
    slots = [_slots(cfg, z) for z in zs][0]
    # one split seed for every zoo: twin zoos (the same member draws on other data) keep each member's twins on
    # one side of the split, so a probe never tests on the twin of a training member
    splits = [split_members(_first_usable(z.usable(slots), cfg.max_members), cfg.splits, cfg.split_seed) for z in zs]
    for z, split in zip(zs, splits):
        _check_splits(split, cfg, z)
    return slots, splits


def _first_usable(usable: np.ndarray, n: int) -> np.ndarray:
    """The first n usable members by id (all for n = 0): the same members in twin zoos, nested across n."""
    return usable & (np.cumsum(usable) <= n) if n else usable


def _fit_locked(cfg: FitConfig, zs: list[zoo.Zoo], out: Path, slots, splits, overwrite: bool,
                rank0: bool) -> Path | None:
    last = out / "checkpoints" / "last.ckpt"
    if last.exists() and not overwrite:
        _check_resume(last, cfg, zs)
    z = zs[0]
    mean, std = layer_stats(zs, [np.flatnonzero(sp == TRAIN) for sp in splits], slots,
                            per_layer=cfg.normalize == "layer")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = HyperRepModule(cfg, z.layout, mean, std, z.spec)
    names = sorted({a for zz in zs for a in zz.activations()})
    codes = [activation_codes(zz.field("activation"), names)[0] for zz in zs]
    module.activations = names
    if cfg.beta > 0:
        _set_probe(module, z, cfg, names)
    permuter = Permuter.of(z.spec) if cfg.permute or cfg.align else None
    reference = torch.from_numpy(z.weights(int(np.flatnonzero(splits[0] == TRAIN)[0]), slots[-1])) \
        if cfg.align else None
    dm = ZooDataModule([str(zz.path) for zz in zs], splits, slots, cfg.batch_size, cfg.num_workers, permuter,
                       cfg.permute, reference, codes)
    if overwrite and rank0 and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")
    if rank0:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        with atomic_path(last.with_name("fit.yaml")) as tmp:
            tmp.write_text(yaml.safe_dump(fingerprint(cfg, zs), sort_keys=False))
    trainer = _trainer(cfg, out, len(dm.items(TRAIN)) // cfg.batch_size)
    with warnings.catch_warnings(), weights_only_loads():  # the resume, too, never unpickles code
        warnings.filterwarnings("ignore", message=".*(does not have many workers|num_workers|LeafSpec|"
                                                  "exists and is not empty).*")
        trainer.fit(module, dm, ckpt_path=str(last) if last.exists() else None, weights_only=True)
    if trainer.interrupted:
        raise UsageError(f"fit interrupted; rerun the same command to resume from {last}")
    if trainer.global_rank != 0:
        return None
    _export(out, module, cfg, zs, splits, slots, trainer)
    return out


def _set_probe(module: HyperRepModule, z: zoo.Zoo, cfg: FitConfig, names: list[str]) -> None:
    """The functional loss's probe images: a seeded sample of the zoo's training images (never test images)."""
    data = z.dataset()
    idx = np.sort(np.random.default_rng(cfg.seed).permutation(len(data.y_train))[:cfg.probe_images])
    module.set_probe(data.x_train[torch.from_numpy(idx)], data.mean, data.std, names)


RUN_FORMAT = "weightzoo-hyperrep/1"


def _export(out: Path, module: HyperRepModule, cfg: FitConfig, zs: list[zoo.Zoo], splits, slots, trainer) -> None:
    """model.pt (weights, splits, and the run's metadata as YAML text) is the run's one commit point;
    hyperrep.yaml beside it is a readable copy of the metadata."""
    z = zs[0]
    meta = {"format": RUN_FORMAT, "version": zoo.__version__, "config": to_dict(cfg), "zoo": str(z.path),
            "zoo_build_id": z.build_id, "zoos": [{"path": str(zz.path), "build_id": zz.build_id,
                                                  "dataset": str(zz.config.get("dataset"))} for zz in zs],
            "architecture": z.architecture, "spec": z.spec.to_attrs(), "layout": z.layout.to_json(),
            "n_tokens": module.tokenizer.n_tokens, "activations": module.activations,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "epochs_done": int(trainer.current_epoch), "steps_done": int(trainer.global_step)}
    text = yaml.safe_dump(meta, sort_keys=False)
    blob = {"state_dict": module.state_dict(), "split": torch.from_numpy(splits[0]),
            "splits": [torch.from_numpy(sp) for sp in splits], "slots": torch.tensor(slots), "meta": text}
    with atomic_path(out / "model.pt") as tmp:
        torch.save(blob, tmp)
    with atomic_path(out / "hyperrep.yaml") as tmp:
        tmp.write_text(text)
    plot_losses(out)


def _read_run(run: Path) -> tuple[dict, dict]:
    """(blob, meta) of a run's model.pt, loaded with weights_only=True; damage is one clear line."""
    blob = safe_torch_load(run / "model.pt", "hyperrep model")
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
    meta["splits"] = [t.numpy() for t in blob.get("splits", [blob["split"]])]
    meta.setdefault("zoos", [{"path": meta.get("zoo", ""), "build_id": meta.get("zoo_build_id", "")}])
    return module.to(device).eval(), meta
