"""Joining shard zoos: stored-chunk copy (`zoo.join._copy_weights`) against decoding and re-encoding rows.

The 2-GPU HYP build (2 x 1,280 members x 51 checkpoints x 2,464 floats, 1.29 GB of float32) spends time
outside its ranks' training (torchrun start, the barrier, the join); this measures the join's part.

    python benchmarks/join_speed.py                                 # HYP size, ~2 min on 2 CPU cores
    python benchmarks/join_speed.py --members 64 --checkpoints 5    # seconds

Writes two shard files the way `zoo.build` lays them out (gzip 4 + shuffle, one chunk per member and
checkpoint), filled with normal weights (as incompressible as trained ones), then times on the same files:
`join` as it is, the plain h5py copy of the second shard's rows (`dst[i] = src[i]`), which decodes and
re-encodes every chunk, and the consuming join that torchrun uses. Prints the times and the ratio.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo_throughput import hyp_members  # noqa: E402  (this folder is on sys.path when run as a script)

from zoo import ModelSpec, ZooWriter  # noqa: E402
from zoo.build import shard_ids  # noqa: E402
from zoo.join import join  # noqa: E402

CNN_S = ModelSpec("cnn_s", {}, (1, 28, 28), 10)  # 2,464 parameters, as the HYP zoo's members


def write_shard(path: Path, i: int, n: int, members: int, checkpoints: int) -> np.ndarray:
    """A complete shard i of n of HYP-like members (`zoo.build.shard_ids`), left as the build leaves it (the
    finished partial renamed, no table); returns its member ids."""
    specs = hyp_members(members, 10, ("gelu", "relu", "sigmoid", "tanh"))
    ids = shard_ids(specs, i, n)
    rng = np.random.default_rng(i)
    w = ZooWriter.create(path, CNN_S, specs, list(range(checkpoints)), ["test_loss", "test_acc"], dataset="mnist",
                         config="{}", attrs={"shard": f"{i}/{n}"})
    with w:
        for slot in range(checkpoints):
            w.write(ids, slot, (0.1 * rng.standard_normal((len(ids), CNN_S.layout().n_params))),
                    {"test_acc": rng.random(len(ids)), "test_loss": rng.random(len(ids))})
        w.done(ids)
    required = np.zeros(members, bool)
    required[ids] = True
    w.commit(table=False, required=required)
    return ids


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=2560)
    ap.add_argument("--checkpoints", type=int, default=51)
    ap.add_argument("--dir", default=None, help="where the files go (default: a temporary folder)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        shards = [Path(tmp) / f"s{i}.h5" for i in range(2)]
        t0 = time.perf_counter()
        ids = [write_shard(p, i, 2, a.members, a.checkpoints) for i, p in enumerate(shards)]
        params = CNN_S.layout().n_params
        gb = a.members * a.checkpoints * params * 4 / 1e9
        print(f"2 shards, {a.members} members x {a.checkpoints} checkpoints x {params} params "
              f"({gb:.2f} GB float32, {sum(p.stat().st_size for p in shards) / 1e9:.2f} GB on disk) "
              f"written in {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        join(Path(tmp) / "m.h5", shards)
        t_join = time.perf_counter() - t0
        with h5py.File(shards[1]) as s, h5py.File(Path(tmp) / "m.h5") as m:
            assert all(np.array_equal(s["weights"][i], m["weights"][i]) for i in ids[1][:8])
        with h5py.File(shards[1]) as s, h5py.File(Path(tmp) / "rows.h5", "w") as d:
            w = s["weights"]
            dst = d.create_dataset("weights", w.shape, "f4", chunks=w.chunks, compression="gzip",
                                   compression_opts=4, shuffle=True, fillvalue=np.nan)
            t0 = time.perf_counter()
            for i in ids[1]:
                dst[i] = w[i]
            t_rows = time.perf_counter() - t0
        t0 = time.perf_counter()
        join(Path(tmp) / "c.h5", shards, consume=True)  # last: it turns shard 0 into the zoo
        t_consume = time.perf_counter() - t0
    print(f"join (shard 0 by H5Ocopy, shard 1 as stored chunks): {t_join:.2f} s")
    print(f"join consuming the shards (torchrun: shard 0's file becomes the zoo): {t_consume:.2f} s")
    print(f"shard 1's rows decoded and re-encoded alone (the plain h5py copy): {t_rows:.2f} s "
          f"-> join is {t_rows / t_join:.1f}x faster than that copy by itself")


if __name__ == "__main__":
    main()
