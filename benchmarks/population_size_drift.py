"""How much a member's training depends on how many members share its population (float reduction order).

A member's batches, init and dropout masks do not depend on its population mates, but on a GPU the order of
some float sums does: the band-gradient kernel splits rows by population size, cuBLAS picks batched-GEMM
kernels by batch count. In bf16 such differences flip roundings; chaotic members then amplify them. This
trains the same members in a population of M and of M/2 (rank 0's shard of 2, `zoo.build.shard_ids`) and
prints their relative weight difference as steps go by, with the same members' bf16-vs-fp32 difference as
the scale of float-level noise.

Device run (MNIST carried):  python benchmarks/population_size_drift.py --config configs/zoo/mnist_cnn_s_hyp.yaml
CPU smoke run:                python benchmarks/population_size_drift.py --dataset digits --steps 1,3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo import Population, ZooConfig, load_dataset  # noqa: E402
from zoo.build import DEFAULT_ZOO, run_order, shard_ids  # noqa: E402
from zoo.cli import load_config  # noqa: E402
from zoo.config import expand_members  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, P) x 2 -> (M,) relative L2 difference per member."""
    return (a - b).norm(dim=1) / b.norm(dim=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="zoo config whose members to train (default: the embedded digits zoo)")
    ap.add_argument("--dataset", help="override the config's dataset")
    ap.add_argument("--steps", default="1,10,100,1000", help="report after these steps (comma-separated)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    over = [f"dataset={args.dataset}"] if args.dataset else []
    cfg = load_config(ZooConfig, args.config, over, None if args.config else DEFAULT_ZOO)
    members = expand_members(cfg)
    first, every = run_order(members, shard_ids(members, 0, 2)), run_order(members, range(len(members)))
    pos = torch.tensor([every.index(j) for j in first])  # rank 0's members' rows in the big population
    data = load_dataset(cfg.dataset, cfg.data_root, False, cfg.grayscale, cfg.resize, cfg.val_fraction, args.device)
    pops = {name: Population(cfg.architecture, cfg.architecture_kwargs, [members[j] for j in ids], data, precision=p)
            for name, ids, p in [("all", every, "bf16"), ("half", first, "bf16"), ("half_fp32", first, "fp32")]}
    order = {k: p.epoch_order(1) for k, p in pops.items()}
    done = 0
    for stop in sorted(int(s) for s in args.steps.split(",")):
        for k, p in pops.items():
            p.run_steps(order[k], 1, range(done, stop))
        done = stop
        w = {k: p.flat_weights() for k, p in pops.items()}
        w["all"] = w["all"][pos.to(w["all"].device)]
        size, prec = rel(w["half"], w["all"]), rel(w["half_fp32"], w["all"])
        q = lambda v: " ".join(f"{s} {float(v.nanquantile(x)):.2g}"
                               for s, x in [("median", .5), ("q90", .9), ("max", 1.)])
        print(f"step {stop}: population {len(members)} vs {len(first)}: {q(size)} | bf16 vs fp32: {q(prec)}",
              flush=True)


if __name__ == "__main__":
    main()
