"""Reading zoo files: HDF5 `NAME.h5` + Parquet `NAME.parquet`, format `weightzoo-zoo/1` (docs/zoo-format.md).

The HDF5 file is the zoo; the Parquet table is derived from it and carries the HDF5 file's `build_id`: a
table whose id differs (left by an interrupted `--overwrite`) is ignored and derived anew from the HDF5 file.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from .cli import UsageError
from .config import HPARAMS, MemberSpec
from .data import DataSpec, ImageData
from .spec import Layout, ModelSpec

FORMAT = "weightzoo-zoo/1"
REQUIRED = ("weights", "checkpoints/epoch", "models/done", "models/diverged", "metrics/test_acc", "metrics/test_loss")
_NOT_COLUMNS = ("model_id", "done", "population")  # /models datasets that are bookkeeping, not table columns


def _column(v: np.ndarray, k: int) -> Any:
    """A per-model array repeated for its k checkpoints; strings decoded."""
    return np.repeat(v.astype(str) if v.dtype.kind in "OS" else v, k)


def table_from_h5(f: h5py.File) -> pa.Table:
    """The Parquet table: one row per (model, checkpoint), derived from the HDF5 file alone. Metrics not
    reached (NaN in HDF5) are nulls, so SQL aggregates skip them."""
    n, k = f["weights"].shape[:2]
    cols: dict[str, Any] = {
        "model_id": np.repeat(f["models/model_id"][:], k),
        "checkpoint": np.tile(np.arange(k, dtype=np.int32), n),
        "epoch": np.tile(f["checkpoints/epoch"][:], n),
    }
    for name in f["models"]:
        if name not in _NOT_COLUMNS:
            cols[name] = _column(f[f"models/{name}"][:], k)
    for name in f["metrics"]:
        v = f[f"metrics/{name}"][:].reshape(-1)
        cols[name] = pa.array(v, mask=np.isnan(v))
    cols["dataset"] = np.full(n * k, f.attrs["dataset"])
    cols["architecture"] = np.full(n * k, f.attrs["architecture"])
    meta = {"format": FORMAT, "version": str(f.attrs["version"]), "build_id": str(f.attrs.get("build_id", ""))}
    return pa.table(cols).replace_schema_metadata({b"weightzoo": json.dumps(meta).encode()})


def table_build_id(path: Path) -> str | None:
    """The build id a Parquet table was derived from (None for a table without one)."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"weightzoo", b"{}")).get("build_id")


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise UsageError(f"zoo {path} does not exist; build one with python -m zoo.build --out {path}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        locked = "lock" in str(e).lower()
        reason = "it is being written by another process" if locked else "it is not a readable HDF5 file"
        raise UsageError(f"cannot open zoo {path}: {reason}") from None


class Zoo:
    """A zoo opened for reading. `member` indexes models, `checkpoint` indexes checkpoint slots."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = _open_h5(self.path)
        try:
            self._read_attrs()
        except BaseException:
            self.file.close()
            raise

    def _read_attrs(self) -> None:
        a = self.file.attrs
        if a.get("format") != FORMAT:
            raise UsageError(f"{self.path} is not a weightzoo zoo (format attribute is {a.get('format')!r}, "
                             f"expected {FORMAT!r})")
        missing = [k for k in ("architecture", "architecture_kwargs", "input_shape", "num_classes", "layout",
                               "config", "dataset", "version") if k not in a] + \
            [k for k in REQUIRED if k not in self.file]
        if missing:
            raise UsageError(f"{self.path} is a damaged zoo: it lacks '{missing[0]}'; rebuild it")
        try:
            self.spec = ModelSpec.from_attrs(a)
            self.layout = Layout.from_json(a["layout"])
            self.config = yaml.safe_load(a["config"])
        except (ValueError, yaml.YAMLError) as e:
            detail = str(e).splitlines()[0]
            raise UsageError(f"{self.path} is a damaged zoo: unreadable attributes ({detail})") from None
        self.build_id = str(a.get("build_id", ""))
        self.epochs = self.file["checkpoints/epoch"][:]
        self.n_models, self.n_checkpoints, self.n_params = self.file["weights"].shape
        if self.layout.n_params != self.n_params:
            raise UsageError(f"{self.path} is a damaged zoo: its layout covers {self.layout.n_params} parameters, "
                             f"its weights {self.n_params}")

    # the spec's fields, as attributes
    architecture = property(lambda self: self.spec.architecture)
    architecture_kwargs = property(lambda self: dict(self.spec.kwargs))
    input_shape = property(lambda self: self.spec.input_shape)
    num_classes = property(lambda self: self.spec.num_classes)

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def table(self) -> pa.Table:
        """One row per (member, checkpoint). The Parquet file when it belongs to this HDF5 file, else derived."""
        pq_path = self.path.with_suffix(".parquet")
        if pq_path.is_file():
            try:
                if table_build_id(pq_path) == (self.build_id or None) or not self.build_id:
                    return pq.read_table(pq_path)
            except (pa.ArrowInvalid, OSError, ValueError):
                pass  # a damaged table: it is derived data
        return table_from_h5(self.file)

    @property
    def metric_names(self) -> list[str]:
        return list(self.file["metrics"])

    def metric(self, name: str) -> np.ndarray:
        """(n_models, n_checkpoints) float32; NaN where not reached."""
        if name not in self.file["metrics"]:
            raise UsageError(f"{self.path} has no metric '{name}'; it has {', '.join(self.metric_names)}")
        return self.file[f"metrics/{name}"][:]

    @property
    def done(self) -> np.ndarray:
        """(n_models,) bool: finished and written."""
        return self.file["models/done"][:]

    @property
    def diverged(self) -> np.ndarray:
        """(n_models,) bool: stopped for a non-finite loss or exploded weights."""
        return self.file["models/diverged"][:]

    def usable(self, checkpoints=None) -> np.ndarray:
        """(n_models,) bool: done, not diverged, and finite metrics at every given checkpoint slot (default all)."""
        slots = list(range(self.n_checkpoints)) if checkpoints is None else list(checkpoints)
        finite = np.isfinite(self.metric("test_loss")[:, slots]).all(1)
        return self.done & ~self.diverged & finite

    def field(self, name: str) -> np.ndarray:
        """A per-member column of /models (hyperparameters, provenance); strings decoded."""
        if name not in self.file["models"]:
            raise UsageError(f"{self.path} has no per-member field '{name}'")
        v = self.file[f"models/{name}"][:]
        return v.astype(str) if v.dtype.kind in "OS" else v

    def hparams(self, member: int) -> MemberSpec:
        values = {}
        for fld in fields(MemberSpec):
            if fld.name not in self.file["models"]:  # a field newer than the zoo: its default
                continue
            v = self.file[f"models/{fld.name}"][member]
            values[fld.name] = v.decode() if isinstance(v, bytes) else v.item()
        return MemberSpec(**values)

    def members(self) -> list[MemberSpec]:
        """Every member's hyperparameters (one read per column)."""
        cols = {hp: self.field(hp) for hp in HPARAMS if hp in self.file["models"]}
        return [MemberSpec(**{hp: (str(c[i]) if c.dtype.kind == "U" else c[i].item()) for hp, c in cols.items()})
                for i in range(self.n_models)]

    def activations(self) -> list[str]:
        return [str(a) for a in self.field("activation")]

    def weights(self, member: int, checkpoint: int = -1) -> np.ndarray:
        """(n_params,) float32."""
        return self.file["weights"][member, checkpoint % self.n_checkpoints]

    def weight_rows(self, members, checkpoint: int = -1) -> np.ndarray:
        """(len(members), n_params) float32 at one checkpoint slot."""
        return self.weight_items(members, checkpoint)

    def weight_items(self, members, slots, block: int = 256) -> np.ndarray:
        """(n, n_params) float32 rows of (member, checkpoint slot) pairs, in the order given (repeats allowed).
        Reads boxes of up to `block` consecutive members x the slot range they need as one HDF5 slice where the
        pairs fill at least a third of the box (a slice costs ~1/3 of a point selection per chunk), else
        one read per pair (sparse pairs: cheaper than h5py's point selections)."""
        members = np.asarray(members, np.int64).ravel()
        slots = np.broadcast_to(np.asarray(slots, np.int64) % self.n_checkpoints, members.shape)
        out = np.empty((len(members), self.n_params), np.float32)
        w = self.file["weights"]
        for b in np.unique(members // block):
            at = np.flatnonzero(members // block == b)  # the pairs of this block
            m, s = members[at], slots[at]
            m0, m1, s0, s1 = m.min(), m.max() + 1, s.min(), s.max() + 1
            if 3 * len(np.unique(m * self.n_checkpoints + s)) >= (m1 - m0) * (s1 - s0):
                out[at] = w[m0:m1, s0:s1][m - m0, s - s0]  # (m1 - m0, s1 - s0, P) box, then gather
                continue
            for i, mi, si in zip(at, m, s):
                out[i] = w[mi, si]
        return out

    def state_dict(self, member: int, checkpoint: int = -1) -> dict[str, torch.Tensor]:
        return self.layout.unflatten(torch.from_numpy(self.weights(member, checkpoint)))

    def model(self, member: int, checkpoint: int = -1) -> torch.nn.Module:
        """The member as a plain `nn.Module` in eval mode."""
        hp = self.hparams(member)
        net = self.spec.create(hp.activation, hp.dropout)
        net.load_state_dict(self.state_dict(member, checkpoint))
        return net.eval()

    def dataset(self, data_root: str | None = None, device: str = "cpu") -> ImageData:
        """The zoo's dataset, preprocessed as during the build."""
        spec = DataSpec.of(self.config)
        return dataclasses.replace(spec, root=data_root or spec.root, download=False).load(device)


def open_zoo(path: str | Path) -> Zoo:
    return Zoo(path)


PLACEMENT_KEYS = ("device",)  # where a build ran, not what it built: shards and resumes may differ here


def same_zoo_config(a: dict, b: dict) -> bool:
    drop = lambda c: {k: v for k, v in c.items() if k not in PLACEMENT_KEYS}
    return drop(a) == drop(b)


def config_of(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return yaml.safe_load(f.attrs["config"])
