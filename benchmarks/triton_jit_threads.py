"""Do Triton JIT compiles of the band kernels run in parallel across threads (do its passes release the GIL)?

A build compiles its band-kernel specializations one after another (12.9 s per process on the H100,
benchmarks/NOTES.md, "Per-process fixed cost"). This compiles N distinct forward-kernel specializations (cnn_s-like
geometries) as `zoo._triton.precompile` does at population setup (recorded launches, `JITFunction.warmup`,
nothing launched), first serially, then in N threads, each time other geometries into a cold
TRITON_CACHE_DIR, and prints both wall times: a ratio near N means compiling them in threads pays.

Device run (any GPU):
    python benchmarks/triton_jit_threads.py --n 6
CPU smoke run (Triton's interpreter compiles nothing, so both times are ~0):
    TRITON_INTERPRET=1 python benchmarks/triton_jit_threads.py --n 2 --device cpu
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo import _convpool as cp  # noqa: E402
from zoo import _triton  # noqa: E402


def launches(sizes, dev: str) -> list:
    """Recorded (not run) forward launches of cnn_s's first conv (1 -> 8 channels, 5x5, pool 2, 64 members,
    bf16) at these input sizes: one specialization each."""
    with _triton.recording() as out:
        for size in sizes:
            x = torch.randn(10, 64, 1, size, size, device=dev, dtype=torch.bfloat16)
            cp.conv_pool(x, torch.randn(64, 8, 1, 5, 5, device=dev), torch.randn(64, 8, device=dev), 1, 0, 2)
    return out


def timed(recorded, threads: int) -> float:
    t0 = time.perf_counter()
    _triton.precompile(recorded, threads)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="tri_jit_"))  # cold
    sizes = [28 + 4 * i for i in range(2 * args.n + 1)]  # distinct kernels for each timing: none from a cache
    timed(launches(sizes[:1], args.device), 1)  # Triton's one-time set-up (driver, launcher build), not timed
    recorded = [launches(sizes[1: args.n + 1], args.device), launches(sizes[args.n + 1:], args.device)]
    assert all(len(_triton.distinct(r)) == args.n for r in recorded), "expected one specialization per size"
    serial, threaded = timed(recorded[0], 1), timed(recorded[1], args.n)
    print(f"{args.n} band-kernel compiles: serial {serial:.2f} s, {args.n} threads {threaded:.2f} s, "
          f"speed-up {serial / max(threaded, 1e-9):.2f}x")


if __name__ == "__main__":
    main()
