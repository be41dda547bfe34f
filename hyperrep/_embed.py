"""Embedding every (member, checkpoint) of a zoo into an embeddings file (CLI: hyperrep.embed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import zoo
from zoo.build import resolve_device
from zoo.io import check_new_output, output_lock

from ._fit import load_run
from ._reconstruct import check_compatible, run_split
from .embeddings import EXCLUDED, write_embeddings


def embed_zoo(zoo_path: str | Path, run: str | Path, out: str | Path | None = None, overwrite: bool = False,
              device: str = "auto", batch_size: int = 256, progress: bool = True, sequence: bool = False) -> Path:
    """Embed every finished, non-diverged (member, checkpoint) of a zoo; the HDF5 file is written last.
    sequence: also keep every token's latent (n_models, n_checkpoints, T, d_latent), whose mean is the embedding."""
    dev = resolve_device(device)
    z = zoo.open_zoo(zoo_path)
    out = Path(out or z.path.with_suffix(".embeddings.h5"))
    check_new_output(out, overwrite, "embeddings file")
    module, meta = load_run(run, str(dev))
    check_compatible(z, meta, run)
    split = run_split(z, meta)
    split = split if split is not None else np.full(z.n_models, EXCLUDED, np.int8)
    d = module.cfg.d_latent
    emb = np.full((z.n_models, z.n_checkpoints, d), np.nan, np.float32)
    seq = np.full((z.n_models, z.n_checkpoints, len(module.positions), d), np.nan, np.float32) if sequence else None
    rows = [(m, s) for m in np.flatnonzero(z.done & ~z.diverged) for s in range(z.n_checkpoints)]
    with output_lock(out):
        bar = tqdm(total=len(rows), unit="model", disable=not progress, desc="embedding")
        with bar:
            for a in range(0, len(rows), batch_size):
                chunk = rows[a:a + batch_size]
                flats = torch.from_numpy(z.weight_items(*np.array(chunk).T)).to(dev)  # (B, P)
                ok = torch.isfinite(flats).all(1)
                lat = torch.full((len(chunk), len(module.positions), d), float("nan"), device=dev)  # (B, T, d_latent)
                if ok.any():
                    lat[ok] = module.encode_latents(flats[ok]).float()
                where = tuple(np.array(chunk).T)
                emb[where] = lat.mean(1).cpu().numpy()  # module.embed: the mean token latent
                if seq is not None:
                    seq[where] = lat.cpu().numpy()
                bar.update(len(chunk))
        write_embeddings(out, emb, split, z, Path(run), meta, seq)
    return out
