"""Embedding every (member, checkpoint) of a zoo into an embeddings file (CLI: hyperrep.embed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import zoo
from zoo import Layout, UsageError

from ._fit import load_run
from .embeddings import EXCLUDED, write_embeddings


def embed_zoo(zoo_path: str | Path, run: str | Path, out: str | Path | None = None, overwrite: bool = False,
              device: str = "cpu", batch_size: int = 256, progress: bool = True) -> Path:
    z = zoo.open_zoo(zoo_path)
    module, meta = load_run(run, device)
    if z.layout != Layout.from_json(meta["layout"]):
        raise UsageError(f"{run} was fitted on another architecture ({meta['architecture']}) than {z.path} "
                         f"({z.architecture}); fit a hyper-representation on this zoo first")
    out = Path(out or z.path.with_suffix(".embeddings.h5"))
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it")
    same_zoo = Path(meta["zoo"]).resolve() == z.path.resolve()
    split = meta["split"] if same_zoo else np.full(z.n_models, EXCLUDED, np.int8)
    emb = np.full((z.n_models, z.n_checkpoints, module.cfg.d_latent), np.nan, np.float32)
    done = z.done & ~z.diverged
    rows = [(m, s) for m in np.flatnonzero(done) for s in range(z.n_checkpoints)]
    for a in tqdm(range(0, len(rows), batch_size), unit="batch", disable=not progress, desc="embedding"):
        chunk = rows[a:a + batch_size]
        flats = torch.from_numpy(np.stack([z.weights(m, s) for m, s in chunk])).to(device)
        ok = torch.isfinite(flats).all(1)
        e = torch.full((len(chunk), module.cfg.d_latent), float("nan"), device=device)
        if ok.any():
            e[ok] = module.embed(flats[ok]).float()
        emb[tuple(np.array(chunk).T)] = e.cpu().numpy()
    write_embeddings(out, emb, split, z, Path(run), meta)
    return out
