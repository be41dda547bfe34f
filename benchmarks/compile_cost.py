"""Where a build's fixed cost goes: a population's first evaluation and first training steps, cold caches.

Every `zoo.build` rank pays this once per population whatever its size, so on K GPUs it weighs K times as much
against the training that K GPUs split (benchmarks/NOTES.md: ~55 s of a 2-GPU HYP build's ~450 s). Each
phase runs twice, cold then warm (in-process caches filled); the difference is compilation and graph capture.
With --profile the cold pass runs under cProfile and prints where its time went (dynamo tracing, inductor
code generation, Triton JIT compiles of the band kernels, waits on inductor's compile workers).

Device run (MNIST carried; a fresh process per call keeps the on-disk caches cold):
    python benchmarks/compile_cost.py --dataset mnist --members 1280 --acts gelu,relu --profile
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
import cProfile  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch._inductor.config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo.data import load_dataset  # noqa: E402
from zoo.population import Population  # noqa: E402
from zoo_throughput import hyp_members  # noqa: E402  (this folder is on sys.path when run as a script)

# (label, file suffix, function): cumulative time inside these, summed over a phase's profile
BUCKETS = [
    ("dynamo: trace + compile (all below)", "_dynamo/convert_frame.py", "_compile"),
    ("inductor: every graph (incl. the backward)", "_inductor/compile_fx.py", "compile_fx_inner"),
    ("inductor: of which compile_to_module", "_inductor/graph.py", "_compile_to_module"),
    ("inductor: waits on compile workers", "_inductor/async_compile.py", "wait"),
    ("triton: JIT compiles in this process", "triton/compiler/compiler.py", "compile"),
    ("cuda graph capture", "torch/cuda/graphs.py", "__exit__"),
]


def _bucket_table(stats: pstats.Stats) -> str:
    rows = []
    for label, suffix, fn in BUCKETS:
        cum = sum(v[3] for (f, _, name), v in stats.stats.items() if f.endswith(suffix) and name == fn)
        rows.append(f"    {label:<42} {cum:7.2f} s")
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("cumulative").print_stats(18)
    return "\n".join(rows) + "\n" + "\n".join("    " + line for line in out.getvalue().splitlines()[-24:])


def timed(name: str, fn, device: torch.device, profile: bool = False):
    """Run fn, print its wall seconds (after a device sync) and, when profiled, where they went."""
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if prof:
        prof.disable()
    print(f"{name:<40} {time.perf_counter() - t0:8.2f} s", flush=True)
    if prof:
        print(_bucket_table(pstats.Stats(prof)), flush=True)
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
    ap.add_argument("--profile", action="store_true", help="profile the cold passes")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="set torch._inductor.config.KEY (Python literal), e.g. triton.autotune_pointwise=False")
    args = ap.parse_args()
    for item in args.inductor:
        key, value = item.split("=", 1)
        setattr(torch._inductor.config, key, ast.literal_eval(value))  # unknown keys raise
    dev = torch.device(args.device)
    data = load_dataset(args.dataset, args.data_root, device=dev)
    members = hyp_members(args.members, args.batch, args.acts.split(","), args.opts.split(","))
    print(f"{args.arch}, {args.members} members ({args.acts} x {args.opts}), batch {args.batch}, {args.precision}, "
          f"{dev}; caches {os.environ['TORCHINDUCTOR_CACHE_DIR']}; inductor {args.inductor}", flush=True)
    pop = timed("setup (incl. eager forward: JIT)", lambda: Population(
        args.arch, {}, members, data, train_eval_samples=args.eval_samples, precision=args.precision,
        compile=True, cuda_graphs=True), dev, args.profile)
    timed("evaluate, cold", pop.evaluate, dev, args.profile)
    timed("evaluate, warm", pop.evaluate, dev)
    timed(f"train {args.steps} steps, cold", lambda: pop.train_epoch(1, args.steps), dev, args.profile)
    timed(f"train {args.steps} steps, warm", lambda: pop.train_epoch(2, args.steps), dev)


if __name__ == "__main__":
    main()
