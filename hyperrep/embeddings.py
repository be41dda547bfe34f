"""Embeddings files (`NAME.embeddings.h5`, format `weightzoo-embeddings/1`): written by `hyperrep.embed`,
read by the probes.

/embeddings [n_models, n_checkpoints, d_latent] float32 (NaN for members that did not finish or diverged),
/split [n_models] int8 (TRAIN 0, VAL 1, TEST 2 of the hyperrep fit; EXCLUDED -1: not in the fit),
/checkpoints/epoch, /models/model_id; optionally /sequence [n_models, n_checkpoints, n_tokens, d_latent] (every
token's latent: `hyperrep.embed sequence=true`). Root attributes: the zoo, the run directory, `model_sha256` (the
identity of the encoder: a hash of its model.pt), the run's config, version and a build id shared with the Parquet
keys.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

import zoo
from zoo import UsageError
from zoo.io import atomic_path

FORMAT = "weightzoo-embeddings/1"
TRAIN, VAL, TEST, EXCLUDED = 0, 1, 2, -1


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Embeddings:
    """An embeddings file, read whole (embeddings are small: d_latent floats per member and checkpoint)."""
    path: Path
    embeddings: np.ndarray  # (n_models, n_checkpoints, d_latent)
    split: np.ndarray  # (n_models,) int8
    epochs: np.ndarray  # (n_checkpoints,)
    zoo: str
    model: str
    model_sha256: str
    sequence: np.ndarray | None = None  # (n_models, n_checkpoints, n_tokens, d_latent), when stored

    @classmethod
    def open(cls, path: str | Path) -> "Embeddings":
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"embeddings file {path} does not exist; run python -m hyperrep.embed first")
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise UsageError(f"{path} is not a weightzoo embeddings file (format {f.attrs.get('format')!r})")
                epochs = f["checkpoints/epoch"][:] if "checkpoints/epoch" in f else np.arange(f["embeddings"].shape[1])
                return cls(path, f["embeddings"][:], f["split"][:], epochs, str(f.attrs.get("zoo", "")),
                           str(f.attrs.get("model", "")), str(f.attrs.get("model_sha256", "")),
                           f["sequence"][:] if "sequence" in f else None)
        except (OSError, KeyError) as e:
            raise UsageError(f"{path} is not a readable embeddings file ({type(e).__name__}: {e}); "
                             f"rerun python -m hyperrep.embed") from None


def write_embeddings(out: Path, emb: np.ndarray, split: np.ndarray, z: zoo.Zoo, run: Path, meta: dict,
                     sequence: np.ndarray | None = None) -> None:
    """The HDF5 file is the commit point (renamed last); the Parquet keys beside it are derived and carry its
    build id."""
    build_id = uuid.uuid4().hex
    n, k = emb.shape[:2]
    table = pa.table({"model_id": np.repeat(np.arange(n), k), "checkpoint": np.tile(np.arange(k, dtype=np.int32), n),
                      "epoch": np.tile(z.epochs.astype(np.int32), n), "split": np.repeat(split.astype(np.int8), k),
                      "row": np.arange(n * k)})
    table = table.replace_schema_metadata({b"weightzoo": json.dumps({"format": FORMAT, "build_id": build_id}).encode()})
    with atomic_path(out.with_suffix(".parquet")) as tmp:
        pq.write_table(table, tmp)
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("embeddings", data=emb, chunks=(1, emb.shape[1], emb.shape[2]))
            f.create_dataset("split", data=split.astype(np.int8))
            if sequence is not None:
                f.create_dataset("sequence", data=sequence, chunks=(1, 1, *sequence.shape[2:]))
            f.create_dataset("checkpoints/epoch", data=z.epochs.astype(np.int32))
            f.create_dataset("models/model_id", data=np.arange(n, dtype=np.int64))
            f.attrs.update({"format": FORMAT, "zoo": str(z.path), "model": str(run), "version": zoo.__version__,
                            "model_sha256": file_sha256(Path(run) / "model.pt"), "build_id": build_id,
                            "config": yaml.safe_dump(meta["config"], sort_keys=False)})
