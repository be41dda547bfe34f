"""Zoo files: HDF5 `NAME.h5` + Parquet `NAME.parquet`, format `weightzoo-zoo/1` (shared/design/zoo-format.md).

Writing goes to `NAME.h5.partial` through a background thread (so HDF5 compression overlaps training)
and is renamed when every member is done. Reading: `open_zoo(path)`.
"""
from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from . import __version__
from ._config import UsageError
from .config import HPARAMS, MemberSpec
from .data import ImageData, load_dataset
from .models import create_model, unflatten

FORMAT = "weightzoo-zoo/1"
_STR = h5py.string_dtype("utf-8")


def create_partial(path: Path, cfg_yaml: str, attrs: dict[str, Any], members: Sequence[MemberSpec],
                   checkpoints: Sequence[int], n_params: int, metric_names: Sequence[str], plan: np.ndarray) -> None:
    """Lay out every dataset at full size (unwritten chunks cost nothing on disk) with NaN fill."""
    n, k = len(members), len(checkpoints)
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": FORMAT, "config": cfg_yaml, "version": __version__, **attrs})
        f.create_dataset("weights", (n, k, n_params), "f4", chunks=(1, 1, n_params), compression="gzip",
                         compression_opts=4, shuffle=True, fillvalue=np.nan)
        f.create_dataset("checkpoints/epoch", data=np.asarray(checkpoints, np.int32))
        for name in metric_names:
            f.create_dataset(f"metrics/{name}", (n, k), "f4", fillvalue=np.nan)
        f.create_dataset("models/model_id", data=np.arange(n, dtype=np.int64))
        f.create_dataset("models/done", data=np.zeros(n, bool))
        f.create_dataset("models/diverged", data=np.zeros(n, bool))
        f.create_dataset("models/population", data=plan.astype(np.int32))
        for hp in HPARAMS:
            values = [getattr(m, hp) for m in members]
            f.create_dataset(f"models/{hp}", data=np.asarray(values, dtype=_STR if isinstance(values[0], str) else None))


class AsyncWriter:
    """Writes checkpoint rows and done flags on a background thread; errors resurface on `close`."""

    def __init__(self, path: Path):
        self.path, self.jobs, self.error = path, queue.Queue(maxsize=64), None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        with h5py.File(self.path, "r+") as f:
            while (job := self.jobs.get()) is not None:
                if self.error is not None:
                    continue
                try:
                    self._write(f, *job)
                except Exception as e:  # kept and re-raised in the main thread
                    self.error = e

    @staticmethod
    def _write(f: h5py.File, kind: str, ids: np.ndarray, slot: int, payload: dict):
        if kind == "checkpoint":
            w = payload.pop("weights")
            for row, i in enumerate(ids):  # row by row: one chunk each
                f["weights"][i, slot] = w[row]
            for name, v in payload.items():
                f[f"metrics/{name}"][ids, slot] = v
        else:  # all checkpoints of these members are written: mark them done
            f["models/diverged"][ids] = payload["diverged"]
            f["models/done"][ids] = True
            f.flush()

    def checkpoint(self, ids: np.ndarray, slot: int, weights: np.ndarray, metrics: dict[str, np.ndarray]):
        self._put(("checkpoint", ids, slot, {"weights": weights, **metrics}))

    def done(self, ids: np.ndarray, diverged: np.ndarray):
        self._put(("done", ids, 0, {"diverged": diverged}))

    def _put(self, job):
        if self.error is not None:
            raise self.error
        self.jobs.put(job)

    def close(self):
        self.jobs.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def table_from_h5(f: h5py.File) -> pa.Table:
    """The Parquet table: one row per (model, checkpoint), derived from the HDF5 file alone."""
    n, k = f["weights"].shape[:2]
    cols: dict[str, Any] = {
        "model_id": np.repeat(f["models/model_id"][:], k),
        "checkpoint": np.tile(np.arange(k, dtype=np.int32), n),
        "epoch": np.tile(f["checkpoints/epoch"][:], n),
    }
    for hp in f["models"]:
        if hp not in ("model_id", "done", "population"):
            v = f[f"models/{hp}"][:]
            cols[hp] = np.repeat(v.astype(str) if v.dtype.kind in "OS" else v, k)
    for name in f["metrics"]:
        cols[name] = f[f"metrics/{name}"][:].reshape(-1)
    cols["dataset"] = np.full(n * k, f.attrs["dataset"])
    cols["architecture"] = np.full(n * k, f.attrs["architecture"])
    meta = {b"weightzoo": json.dumps({"format": FORMAT, "version": f.attrs["version"]}).encode()}
    return pa.table(cols).replace_schema_metadata(meta)


def write_table(h5_path: Path, parquet_path: Path) -> None:
    with h5py.File(h5_path, "r") as f:
        table = table_from_h5(f)
    tmp = parquet_path.with_name(parquet_path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, parquet_path)


class Zoo:
    """A zoo opened for reading. `member` indexes models, `checkpoint` indexes checkpoint slots."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"zoo {self.path} does not exist; build one with python -m zoo.build --out {self.path}")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError:
            raise UsageError(f"{self.path} is not an HDF5 file; pass a zoo built by python -m zoo.build") from None
        if self.file.attrs.get("format") != FORMAT:
            raise UsageError(f"{self.path} is not a weightzoo zoo (format attribute is "
                             f"{self.file.attrs.get('format')!r}, expected {FORMAT!r})")
        a = self.file.attrs
        self.architecture = str(a["architecture"])
        self.architecture_kwargs = json.loads(a["architecture_kwargs"])
        self.input_shape = tuple(json.loads(a["input_shape"]))
        self.num_classes = int(a["num_classes"])
        self.layout = json.loads(a["layout"])
        self.config = yaml.safe_load(a["config"])
        self.epochs = self.file["checkpoints/epoch"][:]
        self.n_models, self.n_checkpoints, self.n_params = self.file["weights"].shape

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def table(self) -> pa.Table:
        pq_path = self.path.with_suffix(".parquet")
        return pq.read_table(pq_path) if pq_path.is_file() else table_from_h5(self.file)

    def metric(self, name: str) -> np.ndarray:
        """(n_models, n_checkpoints)."""
        return self.file[f"metrics/{name}"][:]

    def hparams(self, member: int) -> MemberSpec:
        values = {}
        for fld in fields(MemberSpec):
            v = self.file[f"models/{fld.name}"][member]
            values[fld.name] = v.decode() if isinstance(v, bytes) else v.item()
        return MemberSpec(**values)

    def weights(self, member: int, checkpoint: int = -1) -> np.ndarray:
        """(n_params,) float32."""
        return self.file["weights"][member, checkpoint % self.n_checkpoints]

    def state_dict(self, member: int, checkpoint: int = -1) -> dict[str, torch.Tensor]:
        return unflatten(torch.from_numpy(self.weights(member, checkpoint)), self.layout)

    def model(self, member: int, checkpoint: int = -1) -> torch.nn.Module:
        """The member as a plain `nn.Module` in eval mode."""
        hp = self.hparams(member)
        C, H, _ = self.input_shape
        net = create_model(self.architecture, in_channels=C, input_size=H, num_classes=self.num_classes,
                           activation=hp.activation, dropout=hp.dropout, **self.architecture_kwargs)
        net.load_state_dict(self.state_dict(member, checkpoint))
        return net.eval()

    def dataset(self, data_root: str | None = None, device: str = "cpu") -> ImageData:
        """The zoo's dataset, preprocessed as during the build."""
        c = self.config
        return load_dataset(c["dataset"], data_root or c["data_root"], False, c["grayscale"], c["resize"],
                            c["val_fraction"], device)


def open_zoo(path: str | Path) -> Zoo:
    return Zoo(path)


def merge(out: Path, shards: Sequence[Path], overwrite: bool = False, consume: bool = False) -> Path:
    """Join shard files (each complete for its members) into one zoo. With `consume` (temporary shards, as
    torchrun's), the first shard file becomes the zoo and the others are copied into it; the caller
    deletes them. Otherwise the shards are left as they are."""
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it or choose another output path")
    partial = out.with_name(out.name + ".partial")
    srcs = [h5py.File(p, "r") for p in shards]
    try:
        _check_shards(shards, srcs)
        if consume:  # saves copying the first shard (~1/K of the zoo)
            srcs[0].close()
            os.replace(shards[0], partial)
            f = h5py.File(partial, "r+")
        else:
            f = h5py.File(partial, "w")
            for key in srcs[0]:
                srcs[0].copy(srcs[0][key], f, name=key)
            f.attrs.update(dict(srcs[0].attrs))
        try:
            with f:
                f.attrs.pop("shard", None)
                for s in srcs[1:]:
                    _copy_members(s, f)
        except BaseException:
            if consume:  # give shard 0 its file back (complete for its members; a rerun merges again)
                os.replace(partial, shards[0])
            raise
    finally:
        for s in srcs:
            s.close()
    os.replace(partial, out)
    write_table(out, out.with_suffix(".parquet"))
    return out


def _check_shards(shards: Sequence[Path], srcs: Sequence[h5py.File]) -> None:
    """Same zoo config in every shard, and every member built in one of them."""
    base_cfg = yaml.safe_load(srcs[0].attrs["config"])
    done = np.zeros(srcs[0]["weights"].shape[0], bool)
    for p, s in zip(shards, srcs):
        if s.attrs.get("format") != FORMAT or not same_zoo_config(yaml.safe_load(s.attrs["config"]), base_cfg):
            raise UsageError(f"shard {p} is not a shard of the same zoo as {shards[0]} (config differs)")
        done |= s["models/done"][:]
    if not done.all():
        raise UsageError(f"shards leave {int((~done).sum())} members unbuilt (e.g. model {int(np.argmin(done))}); "
                         f"build the missing --shard i/n first")


def _copy_members(src: h5py.File, dst: h5py.File) -> None:
    """The finished members of shard `src` into zoo file `dst`: weights, metrics, flags."""
    ids = np.flatnonzero(src["models/done"][:])
    _copy_weights(src["weights"], dst["weights"], ids)
    for name in src["metrics"]:
        dst[f"metrics/{name}"][ids] = src[f"metrics/{name}"][ids]
    for name in ("done", "diverged"):
        dst[f"models/{name}"][ids] = src[f"models/{name}"][ids]


def _copy_weights(src: h5py.Dataset, dst: h5py.Dataset, ids: np.ndarray) -> None:
    """Copy these members' weight rows. Chunks of one member each go across as stored (compressed bytes):
    decoding and re-encoding one HYP shard's 0.64 GB took 14 s on 2 CPU cores (`benchmarks/merge_speed.py`).
    Other layouts, and h5py without `chunk_iter` (it needs h5py >= 3.8 on HDF5 >= 1.12.3), copy row by row."""
    same_layout = (src.chunks, src.compression, src.compression_opts, src.shuffle) == \
        (dst.chunks, dst.compression, dst.compression_opts, dst.shuffle)
    if not same_layout or src.chunks is None or src.chunks[0] != 1 or not hasattr(src.id, "chunk_iter"):
        for i in ids:
            dst[i] = src[i]
        return
    keep = np.zeros(src.shape[0], bool)
    keep[ids] = True
    offsets: list[tuple[int, ...]] = []  # allocated chunks only: never-written rows stay NaN fill
    src.id.chunk_iter(lambda info: offsets.append(info.chunk_offset))  # one pass (get_chunk_info(k) is O(k))
    for offset in offsets:
        if keep[offset[0]]:
            mask, data = src.id.read_direct_chunk(offset)
            dst.id.write_direct_chunk(offset, data, mask)


PLACEMENT_KEYS = ("device",)  # where a build ran, not what it built: shards and resumes may differ here


def same_zoo_config(a: dict, b: dict) -> bool:
    drop = lambda c: {k: v for k, v in c.items() if k not in PLACEMENT_KEYS}
    return drop(a) == drop(b)


def config_of(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return yaml.safe_load(f.attrs["config"])
