"""How many kernels inductor generates for one compiled training step, per mix of activations and optimizers.

A population sorted by (activation, optimizer) runs one slice per activation and per optimizer, each with its
own kernels. In a CUDA graph every kernel costs a few microseconds however little it does, so at small
batches the kernel count is a fixed cost per step that does not shrink with members (one reason a HYP epoch
on 2 GPUs takes more than half as long as on one). This counts the kernels inductor generates for a training
step (forward, backward, optimizer update) of each mix; the custom Triton conv kernels (GPU only) come on top
and do not depend on the mix.

Device run (MNIST carried):
    python benchmarks/step_kernels.py --dataset mnist --arch cnn_s --members 1280 --device cuda
CPU run (~1 min; cnn_gap, digits):
    python benchmarks/step_kernels.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch._inductor.metrics as inductor_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo_throughput import hyp_members  # noqa: E402  (this folder is on sys.path when run as a script)

from zoo.data import load_dataset  # noqa: E402
from zoo.population import Population  # noqa: E402

MIXES = "tanh:adam;gelu,relu:adam,sgd;gelu,relu,sigmoid,tanh:adam,sgd"


def kernels(arch: str, data, n: int, acts: list[str], opts: list[str], batch: int) -> int:
    """Kernels inductor generates for a compiled step of n members cycling through acts x opts."""
    pop = Population(arch, {}, hyp_members(n, batch, acts, opts), data, compile=True)
    order = pop.epoch_order(1)
    torch._dynamo.reset()
    inductor_metrics.reset()
    pop.run_steps(order, 1, range(2))
    return inductor_metrics.generated_kernel_count


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default="data/datasets")
    ap.add_argument("--arch", default="cnn_gap")
    ap.add_argument("--members", type=int, default=32)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--mixes", default=MIXES, help="'acts:optimizers' mixes separated by ';'")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    data = load_dataset(args.dataset, args.data_root, device=torch.device(args.device))
    for mix in args.mixes.split(";"):
        acts, opts = (part.split(",") for part in mix.split(":"))
        k = kernels(args.arch, data, args.members, acts, opts, args.batch)
        print(f"{args.arch}, {len(acts)} activations x {len(opts)} optimizers ({mix}): {k} generated kernels "
              f"per step", flush=True)


if __name__ == "__main__":
    main()
