"""Do Triton JIT compiles of the band kernels run in parallel across threads (do its passes release the GIL)?

A build compiles its band-kernel specializations one after another (12.9 s per process on the H100,
benchmarks/NOTES.md session 7). This compiles N distinct forward-kernel specializations (cnn_s-like
geometries) with `JITFunction.warmup` (no launch), first serially, then in N threads, each time other geometries
into a cold TRITON_CACHE_DIR, and prints both wall times: a ratio near N means compiling them in threads pays.

Device run (any GPU):
    python benchmarks/triton_jit_threads.py --n 6
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo import _convpool as cp  # noqa: E402


def geometries(n: int) -> list[cp.Band]:
    """n distinct band plans: cnn_s's first conv (1 -> 8 channels, 5x5, pool 2) at growing input sizes."""
    return [cp.band_plan(1, 28 + 4 * i, 28 + 4 * i, 8, 5, 1, 2) for i in range(n)]


def compile_one(band: cp.Band) -> None:
    bf16 = torch.bfloat16
    cp._band_fwd_kernel.warmup(bf16, bf16, torch.float32, bf16, torch.int8, 1280, 1280, 360, *band.kernel_args(),
                               cp.BAND_R, 16, *cp._dot_dtype(bf16), True, grid=(1,), num_warps=cp.NUM_WARPS,
                               num_stages=cp._stages(bf16))


def timed(bands, threads: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(compile_one, bands))
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=6)
    args = ap.parse_args()
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="tri_jit_"))  # cold
    bands = geometries(2 * args.n + 1)  # distinct kernels for each timing: nothing comes from a cache
    timed(bands[:1], 1)  # Triton's own one-time set-up (driver, launcher build) outside the timings
    serial, threaded = timed(bands[1: args.n + 1], 1), timed(bands[args.n + 1:], args.n)
    print(f"{args.n} band-kernel compiles: serial {serial:.2f} s, {args.n} threads {threaded:.2f} s, "
          f"speed-up {serial / threaded:.2f}x")


if __name__ == "__main__":
    main()
