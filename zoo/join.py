"""Join shard zoos (built with `--shard i/n`, or by torchrun's ranks) into one zoo.

    python -m zoo.join data/zoos/hyp.h5 data/zoos/hyp.0.h5 data/zoos/hyp.1.h5
Tiny CPU run:
    python -m zoo.build epochs=1 checkpoints=[0,1] --shard 0/2 --out /tmp/a.h5
    python -m zoo.build epochs=1 checkpoints=[0,1] --shard 1/2 --out /tmp/b.h5
    python -m zoo.join /tmp/ab.h5 /tmp/a.h5 /tmp/b.h5
(`python -m zoo.merge` is the old name of this command and still runs it.)
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import yaml

from .cli import UsageError, run_cli
from .io import check_new_output, output_lock
from .store import FORMAT, same_zoo_config
from .writer import partial_path, write_table


def join(out: Path, shards: Sequence[Path], overwrite: bool = False, consume: bool = False) -> Path:
    """Join shard files (each complete for its members) into one zoo. With `consume` (temporary shards, as
    torchrun's), the first shard file becomes the zoo and the others are copied into it; the caller
    deletes them. Otherwise the shards are left as they are."""
    out = Path(out)
    check_new_output(out, overwrite, "joined zoo")
    with output_lock(out):
        partial = partial_path(out)
        srcs = [_open_shard(p) for p in shards]
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
                if consume:  # give shard 0 its file back (complete for its members; a rerun joins again)
                    os.replace(partial, shards[0])
                raise
        finally:
            for s in srcs:
                s.close()
        os.replace(partial, out)
        write_table(out)
    return out


def _open_shard(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError:
        raise UsageError(f"shard {path} is not a readable HDF5 zoo (truncated or still being written?)") from None


def _check_shards(shards: Sequence[Path], srcs: Sequence[h5py.File]) -> None:
    """Same zoo config in every shard, and every member built in one of them."""
    for p, s in zip(shards, srcs):
        if s.attrs.get("format") != FORMAT or "config" not in s.attrs or "models/done" not in s:
            raise UsageError(f"shard {p} is not a weightzoo zoo shard")
    base_cfg = yaml.safe_load(srcs[0].attrs["config"])
    done = np.zeros(srcs[0]["weights"].shape[0], bool)
    for p, s in zip(shards, srcs):
        same_shape = s["weights"].shape == srcs[0]["weights"].shape
        if not same_zoo_config(yaml.safe_load(s.attrs["config"]), base_cfg) or not same_shape:
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
    decoding and re-encoding one HYP shard's 0.64 GB took 14 s on 2 CPU cores (`benchmarks/join_speed.py`).
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


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m zoo.join", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="joined zoo path (.h5)")
    ap.add_argument("shards", nargs="+", help="shard zoo files")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_intermixed_args(argv)
    if Path(args.out).suffix != ".h5":
        raise UsageError(f"output path {args.out} must end in .h5 (the Parquet table goes beside it)")
    for s in args.shards:
        if not Path(s).is_file():
            raise UsageError(f"shard {s} does not exist")
    if len(set(map(os.path.realpath, args.shards))) != len(args.shards):
        raise UsageError("a shard is listed twice; list each shard file once")
    if os.path.realpath(args.out) in map(os.path.realpath, args.shards):
        raise UsageError(f"output {args.out} is one of the shards; choose another output path")
    print(f"zoo written to {join(Path(args.out), [Path(s) for s in args.shards], args.overwrite)}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
