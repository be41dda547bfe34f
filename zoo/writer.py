"""Writing zoo files: one writer for every producer (build, sampling, merging, import).

    with ZooWriter.create(out, spec, members, epochs=[0, 1], metrics=["test_loss", "test_acc"],
                          dataset="digits", config=cfg_yaml, fields={"source": names}) as w:
        w.write(ids, slot, weights, {"test_acc": acc, ...})   # rows of (members, one checkpoint slot)
        w.done(ids, diverged)
    w.commit()                                                # OUT.h5.partial -> OUT.h5, then OUT.parquet

Every dataset is laid out at full size in `OUT.h5.partial` (unwritten chunks cost nothing on disk, NaN fill);
`commit` checks that every member is done, renames the partial onto `OUT.h5` (the one commit point) and
derives the Parquet table, which carries the HDF5 file's build id so readers never pair a zoo with a stale
table. With `background=True` rows are written on a thread, so HDF5 compression overlaps training.
"""
from __future__ import annotations

import os
import queue
import threading
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np
import pyarrow.parquet as pq

from . import __version__
from .cli import UsageError
from .config import HPARAMS, MemberSpec
from .io import atomic_path
from .spec import ModelSpec
from .store import FORMAT, table_from_h5

_STR = h5py.string_dtype("utf-8")
DESCRIPTIONS = {
    "weights": "flattened parameters of each (member, checkpoint slot), float32, in the 'layout' attribute's order",
    "checkpoints/epoch": "training epoch of each checkpoint slot (0 = at initialisation)",
    "models/done": "member finished and every checkpoint written",
    "models/diverged": "member stopped: a non-finite loss, or a weight magnitude above 1e6 (zoo.population.EXPLODED)",
    "models/model_id": "row index of the member",
}
METRIC_UNITS = {"loss": "mean cross-entropy (nats) per sample", "acc": "fraction of samples classified correctly",
                "sparsity": "fraction of conv/linear weights that are exactly 0"}


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _describe_metric(name: str) -> str:
    split, _, kind = name.rpartition("_")
    unit = METRIC_UNITS.get(kind, METRIC_UNITS.get(name, ""))
    return f"{unit} on the {split} split" if split else unit


def _as_column(values: Sequence) -> np.ndarray:
    arr = np.asarray(values)
    return arr.astype(_STR) if arr.dtype.kind in "OUS" else arr


def _lay_out(f: h5py.File, n_params: int, members: Sequence[MemberSpec], epochs: Sequence[int],
             metrics: Sequence[str], fields: Mapping[str, Sequence]) -> None:
    n, k = len(members), len(epochs)
    f.create_dataset("weights", (n, k, n_params), "f4", chunks=(1, 1, n_params), compression="gzip",
                     compression_opts=4, shuffle=True, fillvalue=np.nan)
    f.create_dataset("checkpoints/epoch", data=np.asarray(epochs, np.int32))
    for name in metrics:
        f.create_dataset(f"metrics/{name}", (n, k), "f4", fillvalue=np.nan).attrs["description"] = \
            _describe_metric(name)
    f.create_dataset("models/model_id", data=np.arange(n, dtype=np.int64))
    f.create_dataset("models/done", data=np.zeros(n, bool))
    f.create_dataset("models/diverged", data=np.zeros(n, bool))
    for hp in HPARAMS:
        f.create_dataset(f"models/{hp}", data=_as_column([getattr(m, hp) for m in members]))
    for name, values in fields.items():
        if name in f["models"]:
            raise ValueError(f"per-member field '{name}' collides with a standard one")
        if len(values) != n:
            raise ValueError(f"per-member field '{name}' has {len(values)} values for {n} members")
        f.create_dataset(f"models/{name}", data=_as_column(values))
    for path, text in DESCRIPTIONS.items():
        f[path].attrs["description"] = text


class ZooWriter:
    """Writes `OUT.h5` through `OUT.h5.partial`; see the module docstring."""

    def __init__(self, out: Path, background: bool = False):
        self.out, self.partial = Path(out), partial_path(Path(out))
        self.file = h5py.File(self.partial, "r+")
        self.error: BaseException | None = None
        self.thread = None
        if background:
            self.jobs: queue.Queue = queue.Queue(maxsize=64)
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    @classmethod
    def create(cls, out: str | Path, spec: ModelSpec, members: Sequence[MemberSpec], epochs: Sequence[int],
               metrics: Sequence[str], *, dataset: str, config: str, attrs: Mapping[str, Any] | None = None,
               fields: Mapping[str, Sequence] | None = None, background: bool = False) -> "ZooWriter":
        """Lay out a new partial zoo (replacing a partial left there) and open it for writing. `config` is the
        producer's full config as YAML; `attrs` more root attributes; `fields` more per-member columns."""
        out = Path(out)
        if not members:
            raise UsageError(f"no members to write to {out}")
        missing = [m for m in ("test_loss", "test_acc") if m not in metrics]
        if missing:
            raise ValueError(f"a zoo records at least test_loss and test_acc; missing {missing[0]}")
        layout = spec.layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(partial_path(out)) as tmp:  # a half-laid-out partial never exists
            with h5py.File(tmp, "w") as f:
                f.attrs.update({"format": FORMAT, "config": config, "version": __version__, "dataset": dataset,
                                "layout": layout.to_json(), "build_id": uuid.uuid4().hex, **spec.to_attrs(),
                                **(attrs or {})})
                _lay_out(f, layout.n_params, members, epochs, metrics, fields or {})
        return cls(out, background)

    @classmethod
    def resume(cls, out: str | Path, background: bool = False) -> "ZooWriter":
        """Open the partial zoo left by an interrupted producer, to write the members not yet done."""
        return cls(Path(out), background)

    # ---- rows ----
    def write(self, ids: np.ndarray, slot: int, weights: np.ndarray, metrics: Mapping[str, np.ndarray]) -> None:
        """Weights (len(ids), P) and metrics (len(ids),) of members `ids` at checkpoint slot `slot`."""
        self._submit(("write", np.asarray(ids), slot, np.asarray(weights, np.float32), dict(metrics)))

    def done(self, ids: np.ndarray, diverged: np.ndarray | None = None) -> None:
        """Mark members `ids` finished (every slot written); `diverged` (len(ids),) bool flags."""
        ids = np.asarray(ids)
        self._submit(("done", ids, np.zeros(len(ids), bool) if diverged is None else np.asarray(diverged, bool)))

    def _submit(self, job) -> None:
        if self.error is not None:
            raise self.error
        if self.thread is None:
            self._do(*job)
        else:
            self.jobs.put(job)

    def _do(self, kind, ids, *rest) -> None:
        f = self.file
        up = np.argsort(ids, kind="stable")  # h5py writes rows at increasing indices; callers may give any order
        ids = ids[up]
        if kind == "write":
            slot, w, metrics = rest
            for row, i in zip(up, ids):  # row by row: one chunk each
                f["weights"][i, slot] = w[row]
            for name, v in metrics.items():
                if name not in f["metrics"]:
                    raise KeyError(f"metric '{name}' was not laid out in {self.partial}")
                f[f"metrics/{name}"][ids, slot] = np.asarray(v)[up]
        else:
            f["models/diverged"][ids] = rest[0][up]
            f["models/done"][ids] = True
            f.flush()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    self._do(*job)
                except BaseException as e:  # kept and re-raised in the producer's thread
                    self.error = e

    # ---- closing ----
    def close(self) -> None:
        """Finish pending writes and close the partial (it stays for a resume)."""
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None
        if self.file.id.valid:
            self.file.close()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> "ZooWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def commit(self, table: bool = True, required: np.ndarray | None = None) -> Path:
        """Rename the complete partial onto OUT.h5 and derive OUT.parquet (skipped with table=False). Every
        member must be done, or those of the `required` mask (a shard's)."""
        self.close()
        with h5py.File(self.partial, "r") as f:
            done = f["models/done"][:]
        missing = ~done & (True if required is None else np.asarray(required, bool))
        if missing.any():
            raise UsageError(f"{self.partial} has {int(missing.sum())} members not done; finish them before commit")
        os.replace(self.partial, self.out)
        if table:
            write_table(self.out)
        return self.out


def write_table(h5_path: Path, parquet_path: Path | None = None) -> Path:
    """Derive the Parquet table of a zoo (atomically: temporary file, then rename)."""
    parquet_path = parquet_path or Path(h5_path).with_suffix(".parquet")
    with h5py.File(h5_path, "r") as f:
        table = table_from_h5(f)
    with atomic_path(parquet_path) as tmp:
        pq.write_table(table, tmp)
    return parquet_path
