"""Where a data-trait population's training step goes: one cnn_s population of trait members
(configs/zoo/mnist_traits.yaml) against the same members without each trait, step time with CUDA graphs, and the
top CUDA kernels of the slowest variant (torch.profiler). Members are laid out in id order, as zoo.build did before
it sorted populations into activation runs: the drawn activations alternate, one slice per alternation (the
156 ms/step of benchmarks/NOTES.md); zoo.build now lays them out with zoo.build.run_order.

    python benchmarks/trait_step_profile.py --members 1200          # one GPU, ~1 min
    python benchmarks/trait_step_profile.py --members 16 --steps 4  # CPU smoke run
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from zoo import ZooConfig, expand_members
from zoo.cli import load_config
from zoo.data import load_dataset
from zoo.population import Population

TRAITS = {"label_noise": 0.0, "train_fraction": 1.0, "class_subset": ""}


def step_ms(members, data, steps: int, precision: str, profile: bool = False) -> float:
    pop = Population("cnn_s", {}, members, data, precision=precision, cuda_graphs=data.x_train.is_cuda)
    sync = torch.cuda.synchronize if data.x_train.is_cuda else (lambda: None)
    pop.train_epoch(1, max_steps=steps)  # warm-up and graph capture
    sync()
    t = time.perf_counter()
    pop.train_epoch(2, max_steps=steps)
    sync()
    ms = (time.perf_counter() - t) / steps * 1e3
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            pop.train_epoch(3, max_steps=steps)
            sync()
        print(p.key_averages().table(sort_by="self_cuda_time_total" if data.x_train.is_cuda else "self_cpu_time_total",
                                     row_limit=15))
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    data = load_dataset("mnist", device=dev)
    members = expand_members(load_config(ZooConfig, "configs/zoo/mnist_traits.yaml", [f"n_random={args.members}"]))
    precision = "bf16" if dev == "cuda" else "fp32"
    variants = {"no traits": {**TRAITS}, **{f"only {k}": {j: v for j, v in TRAITS.items() if j != k} for k in TRAITS},
                "all traits": {}}
    times = {}
    for name, reset in variants.items():
        times[name] = step_ms([dataclasses.replace(m, **reset) for m in members], data, args.steps, precision)
        print(f"{name:>20}: {times[name]:8.2f} ms/step ({len(members)} members, batch 64, {precision})", flush=True)
    slowest = max(times, key=times.get)
    print(f"profile of '{slowest}':")
    step_ms([dataclasses.replace(m, **variants[slowest]) for m in members], data, args.steps, precision, profile=True)


if __name__ == "__main__":
    main()
