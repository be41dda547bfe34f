"""The field's formats out: a zoo as a Hugging Face `datasets` directory (Parquet shards with a weights column
and a dataset card), or its members as safetensors files with their hyperparameters in the metadata (the way
Model-J and RPG publish zoos).

    python -m zoo.export data/zoos/digits_default.h5 --format hf --out data/export/digits_default
    python -m zoo.export data/zoos/digits_default.h5 --format safetensors --out data/export/st --checkpoint -1
Then: `datasets.load_dataset("parquet", data_dir="data/export/digits_default/data")`, or
`safetensors.torch.load_file(...)` + `safe_open(...).metadata()`.
`safetensors` and `datasets` are the optional extra `export` (`pip install -e ".[export]"`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from . import __version__
from .cli import UsageError, run_cli
from .store import Zoo, open_zoo

ROWS_PER_SHARD = 50_000


def _card(z: Zoo, n_rows: int, shards: int) -> str:
    cols = ", ".join(z.table.column_names)
    return f"""---
configs:
- config_name: default
  data_files: "data/*.parquet"
---
# {z.path.stem}

A weightzoo model zoo (format weightzoo-zoo/1, weightzoo {__version__}): {z.n_models} members of `{z.architecture}`
({z.n_params} parameters, input {list(z.input_shape)}, {z.num_classes} classes) on `{z.config.get('dataset')}`,
{z.n_checkpoints} checkpoints each (epochs {', '.join(map(str, z.epochs.tolist()))}).

{n_rows} rows in {shards} Parquet shard(s), one per (member, checkpoint): `weights` (float32 list, the flat
parameters in the order of `layout.json`) and {cols}. Metrics not reached are null.
`layout.json` maps the flat vector onto the state_dict of `zoo.create_model("{z.architecture}", ...)`;
`spec.json` holds the architecture, its arguments, input shape and classes.
"""


def export_hf(z: Zoo, out: Path, progress: bool = True) -> Path:
    """Parquet shards with a `weights` column beside the table's columns, layout.json, spec.json, README.md."""
    table = z.table
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    n = table.num_rows
    shards = max(1, -(-n // ROWS_PER_SHARD))
    for s in tqdm(range(shards), unit="shard", desc="exporting", disable=not progress):
        a, b = s * ROWS_PER_SHARD, min(n, (s + 1) * ROWS_PER_SHARD)
        part = table.slice(a, b - a)
        ids, slots = part.column("model_id").to_numpy(), part.column("checkpoint").to_numpy()
        w = np.stack([z.weights(int(m), int(c)) for m, c in zip(ids, slots)])
        weights = pa.FixedSizeListArray.from_arrays(pa.array(w.reshape(-1), pa.float32()), z.n_params)
        tmp = data / f".train-{s:05d}-of-{shards:05d}.parquet.tmp"
        pq.write_table(part.append_column("weights", weights), tmp)
        tmp.replace(data / f"train-{s:05d}-of-{shards:05d}.parquet")
    (out / "layout.json").write_text(z.layout.to_json())
    (out / "spec.json").write_text(json.dumps(z.spec.to_attrs()))
    (out / "README.md").write_text(_card(z, n, shards))
    return out


def member_metadata(z: Zoo, member: int, slot: int) -> dict[str, str]:
    """safetensors metadata (str -> str): the member's hyperparameters, metrics at the slot, the spec, provenance."""
    hp = {k: v for k, v in vars(z.hparams(member)).items()}
    metrics = {name: float(z.metric(name)[member, slot]) for name in z.metric_names}
    return {"format": "weightzoo-member/1", "weightzoo_version": __version__, "zoo": z.path.name,
            "model_id": str(member), "epoch": str(int(z.epochs[slot])), "hparams": json.dumps(hp),
            "metrics": json.dumps(metrics), "spec": json.dumps(z.spec.to_attrs()), "layout": z.layout.to_json()}


def export_safetensors(z: Zoo, out: Path, checkpoint: int = -1, progress: bool = True) -> Path:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UsageError("safetensors export needs the 'export' extra: pip install -e \".[export]\"") from None
    out.mkdir(parents=True, exist_ok=True)
    slot = checkpoint % z.n_checkpoints
    usable = np.flatnonzero(z.done & ~z.diverged)
    for m in tqdm(usable, unit="member", desc="exporting", disable=not progress):
        state = {k: v.contiguous() for k, v in z.state_dict(int(m), slot).items()}
        tmp = out / f".member_{m:06d}.safetensors.tmp"
        save_file(state, str(tmp), metadata=member_metadata(z, int(m), slot))
        tmp.replace(out / f"member_{m:06d}.safetensors")
    return out


class ZooDataset(torch.utils.data.Dataset):
    """A zoo as a torch Dataset for training your own metanetwork: item i is (weights (P,) float32, targets dict)
    of the i-th usable (member, checkpoint) row; `targets` names table columns (metrics, hyperparameters)."""

    def __init__(self, path: str | Path, targets=("test_acc",), checkpoints=None, transform=None):
        self.path, self.targets, self.transform = Path(path), tuple(targets), transform
        with open_zoo(self.path) as z:
            t = z.table.to_pandas()
            missing = [c for c in self.targets if c not in t]
            if missing:
                raise UsageError(f"{self.path} has no column '{missing[0]}'; columns: {', '.join(t.columns)}")
            t = t[z.done[t["model_id"].to_numpy()] & ~t["diverged"].to_numpy()]
            if checkpoints is not None:
                t = t[t["checkpoint"].isin([c % z.n_checkpoints for c in checkpoints])]
            t = t[np.isfinite(t["test_acc"].to_numpy(np.float64))]
        self.rows = t.reset_index(drop=True)
        self.zoo: Zoo | None = None  # opened per worker process

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if self.zoo is None:
            self.zoo = open_zoo(self.path)
        r = self.rows.iloc[i]
        w = torch.from_numpy(self.zoo.weights(int(r["model_id"]), int(r["checkpoint"])))
        if self.transform is not None:
            w = self.transform(w)
        return w, {k: r[k] for k in self.targets}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m zoo.export", description=__doc__.split("\n")[0])
    ap.add_argument("zoo", help="zoo .h5")
    ap.add_argument("--format", required=True, choices=("hf", "safetensors"))
    ap.add_argument("--out", required=True, help="output directory (must not exist)")
    ap.add_argument("--checkpoint", type=int, default=-1, help="safetensors: the checkpoint slot to export")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.exists():
        raise UsageError(f"{out} already exists; choose a new output directory")
    with open_zoo(a.zoo) as z:
        if not -z.n_checkpoints <= a.checkpoint < z.n_checkpoints:
            raise UsageError(f"--checkpoint {a.checkpoint} out of range: {a.zoo} has slots 0..{z.n_checkpoints - 1}")
        tmp = out.with_name(out.name + ".partial")
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp)
        if a.format == "hf":
            export_hf(z, tmp, not a.quiet)
        else:
            export_safetensors(z, tmp, a.checkpoint, not a.quiet)
        tmp.replace(out)  # the directory appears whole
    print(f"exported to {out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
