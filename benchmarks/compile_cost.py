"""Where a build's fixed cost goes: a population's first evaluation and first training steps, cold caches.

Every `zoo.build` rank pays this once per population whatever its size, so on K GPUs it weighs K times as much
against the training that K GPUs split (~50-80 s per process on the H100: benchmarks/NOTES.md, "Per-process
fixed cost").
Each phase runs twice, cold then warm (in-process caches filled); the difference is compilation, Triton JIT
and graph capture. To see inside a phase, sample the run with py-spy (cProfile does not work here: with
dynamo on Python 3.12 it attributes nothing to the compile functions) and summarize the samples by phase and
by kind of work (dynamo tracing, inductor code generation, Triton JIT compiles of the band kernels, waits on
inductor's compile workers, autotuning, imports):

Device run (MNIST carried; py-spy travels as a wheel in .whl, see /work/.library/device/README.md):
    py-spy record --idle -r 100 --format raw -o spy.txt -- \
        python benchmarks/compile_cost.py --dataset mnist --arch cnn_s --members 1280 --acts gelu,relu
    python benchmarks/compile_cost.py --summarize spy.txt
CPU run (~1 min; digits, cnn_gap, inductor's C++ backend):
    python benchmarks/compile_cost.py
"""
from __future__ import annotations

import os
import tempfile

for _var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # cold on-disk caches unless the caller set them
    os.environ.setdefault(_var, tempfile.mkdtemp(prefix=_var.lower() + "_"))

import argparse  # noqa: E402
import ast  # noqa: E402
import collections  # noqa: E402
import inspect  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo_throughput import hyp_members  # noqa: E402  (this folder is on sys.path when run as a script)

from zoo import _triton  # noqa: E402
from zoo.data import load_dataset  # noqa: E402
from zoo.population import Population  # noqa: E402

# (kind of work, substring of a frame): a sample counts for the first kind any of its frames matches
KINDS = [("import (no .pyc: source compiled)", "_find_and_load"),
         ("triton JIT (band kernels)", "triton/compiler/compiler.py"), ("inductor autotuning", "benchmark"),
         ("inductor autotuning", "autotune"), ("waits on compile workers", "async_compile.py"),
         ("cuda graph capture", "cuda/graphs.py"), ("inductor codegen", "torch/_inductor/"),
         ("aot autograd", "_functorch/"), ("dynamo tracing", "torch/_dynamo/")]


def summarize(path: str, rate: int = 100) -> None:
    """Seconds of py-spy raw samples (`--format raw`, `rate` per second) per phase of this script and kind of
    work (run it on the revision that was sampled: phases are found by line). Idle threads (compile-worker readers,
tqdm) are left out; the backward's compile runs on autograd's
    thread and counts for the training phase."""
    phases: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    lines, first = inspect.getsourcelines(main)  # stacks name main's line: the timed(...) call of a phase
    phases_at = {first + i: re.search(r'timed\(f?"([^"]+)"', text).group(1) for i, text in enumerate(lines)
                 if "timed(" in text}
    for line in open(path):
        stack, n = line.rstrip().rsplit(" ", 1)
        frames = stack.split(";")
        if frames[0].startswith("BackwardCFunction"):
            phase = "train, cold (backward thread)"
        else:
            hit = [phases_at[int(m.group(1))] for m in map(re.compile(r"main \(compile_cost.py:(\d+)\)").match, frames)
                   if m and int(m.group(1)) in phases_at]
            phase = hit[0] if hit else ("module imports" if frames[0].startswith("<module>") else None)
        if phase is None:
            continue
        kind = next((k for k, key in KINDS if key in stack), "other: " + frames[-1].split(" (")[0])
        phases[phase][kind] += int(n)
    for phase, kinds in phases.items():
        print(f"{phase:<40} {sum(kinds.values()) / rate:7.2f} s")
        for kind, n in kinds.most_common(7):
            print(f"    {kind:<44} {n / rate:7.2f} s")


def timed(name: str, fn, device: torch.device):
    """Run fn and print its wall seconds (after a device sync)."""
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"{name:<40} {time.perf_counter() - t0:8.2f} s", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default="data/datasets")
    ap.add_argument("--arch", default="cnn_gap")
    ap.add_argument("--members", type=int, default=64)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--acts", default="gelu,relu,sigmoid,tanh")
    ap.add_argument("--opts", default="adam,sgd")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--eval-samples", type=int, default=10000, help="train_eval_samples of the population")
    ap.add_argument("--steps", type=int, default=20, help="training steps per phase")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--jit-threads", type=int, default=_triton.JIT_THREADS,
                    help="threads compiling the band kernels at setup (1: one after another)")
    ap.add_argument("--summarize", metavar="SPY_RAW", help="only summarize a py-spy raw file of an earlier run")
    ap.add_argument("--rate", type=int, default=100, help="py-spy's samples per second (-r) for --summarize")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="set torch._inductor.config.KEY (Python literal), e.g. triton.autotune_pointwise=False")
    args = ap.parse_args()
    if args.summarize:
        return summarize(args.summarize, args.rate)
    _triton.JIT_THREADS = args.jit_threads
    for item in args.inductor:
        key, value = item.split("=", 1)
        setattr(torch._inductor.config, key, ast.literal_eval(value))  # unknown keys raise
    dev = torch.device(args.device)
    data = load_dataset(args.dataset, args.data_root, device=dev)
    members = hyp_members(args.members, args.batch, args.acts.split(","), args.opts.split(","))
    print(f"{args.arch}, {args.members} members ({args.acts} x {args.opts}), batch {args.batch}, {args.precision}, "
          f"{dev}; caches {os.environ['TORCHINDUCTOR_CACHE_DIR']}; inductor {args.inductor}; "
          f"jit threads {args.jit_threads}", flush=True)
    make = lambda: Population(args.arch, {}, members, data, train_eval_samples=args.eval_samples,  # noqa: E731
                              precision=args.precision, compile=True, cuda_graphs=True)
    pop = timed("setup (incl. kernel JIT)", make, dev)
    timed("evaluate, cold", pop.evaluate, dev)
    timed("evaluate, warm", pop.evaluate, dev)
    timed(f"train {args.steps} steps, cold", lambda: pop.train_epoch(1, args.steps), dev)
    timed(f"train {args.steps} steps, warm", lambda: pop.train_epoch(2, args.steps), dev)


if __name__ == "__main__":
    main()
