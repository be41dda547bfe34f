"""Build a model zoo: train populations of small networks into one HDF5 zoo + Parquet table.

Full size, one GPU (Model Zoos' MNIST hyperparameter zoo, 2,560 members x 50 epochs):
    python -m zoo.build --config configs/zoo/mnist_cnn_s_hyp.yaml --device cuda
Several hosts / a SLURM array: one slice each, then join them:
    python -m zoo.build --config ... --shard 0/4 --out data/zoos/hyp.0.h5   (… 3/4)
    python -m zoo.join data/zoos/hyp.h5 data/zoos/hyp.*.h5
Tiny CPU run (seconds):
    python -m zoo.build epochs=2 checkpoints=[0,1,2] grid.activation=[tanh] --out /tmp/tiny.h5
No arguments: the embedded default (digits, 256 members, 7 checkpoints): about 30 s on 2 CPU cores.
An interrupted build resumes from NAME.h5.partial: finished populations are kept.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch
import yaml
from tqdm import tqdm

from .cli import UsageError, load_config, run_cli, to_yaml
from .config import MemberSpec, ZooConfig, expand_members
from .data import DataSpec, ImageData
from .io import check_new_output, output_lock
from .join import join
from .population import PHASES, Population, TetherMerge, check_members, member_bytes, spec_for, sync, train_and_record
from .sequences import SequenceSpec
from .spec import ModelSpec
from .store import same_zoo_config
from .writer import ZooWriter, partial_path

DEFAULT_ZOO = {
    "name": "digits_default", "dataset": "digits", "architecture": "cnn_gap", "epochs": 8,
    "checkpoints": [0, 1, 2, 3, 4, 6, 8], "seeds": 2,
    "grid": {"init": ["kaiming_uniform", "kaiming_normal", "xavier_uniform", "orthogonal"],
             "activation": ["tanh", "relu", "sigmoid", "gelu"], "optimizer": ["adam", "sgd"],
             "lr": [0.01, 0.05], "dropout": [0.0, 0.3]},
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device '{name}' requested but no CUDA GPU is visible; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UsageError(f"unknown device '{name}'; use cpu, cuda or cuda:N")
    return torch.device(name)


def model_spec(cfg: ZooConfig, data: ImageData) -> ModelSpec:
    """The members' network: the config's architecture on the dataset's images and classes."""
    return spec_for(cfg.architecture, cfg.architecture_kwargs, data)


# On CPU, populations past ~64 members get slower (page faults on huge activation buffers): the default
# build took 29.7 s with 32-64 members per population and 50.1 s with all 256 in one, on 2 cores.
CPU_POPULATION_CAP = 64


def memory_budget(cfg: ZooConfig, device: torch.device) -> float:
    """Bytes a population may use: `memory_fraction` of free GPU memory (CPU: of 8 GiB)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] * cfg.memory_fraction
    return 8 * 2**30 * cfg.memory_fraction


def eval_bytes(cfg: ZooConfig, device: torch.device) -> int:
    """Memory for one evaluation chunk: a quarter of the budget, at least 1 GiB. (On a GPU, 1 GiB meant
    chunks of ~7 images for 2,560 cnn_s members, i.e. thousands of small launches per checkpoint.)"""
    return max(1 << 30, int(memory_budget(cfg, device) / 4))


def run_order(members: Sequence[MemberSpec], ids) -> list[int]:
    """`ids` in the order a population lays members out: by (activation, optimizer), then id, so each
    activation and optimizer is one slice."""
    return sorted(ids, key=lambda j: (members[j].activation, members[j].optimizer, j))


def shard_ids(members: Sequence[MemberSpec], i: int, n: int) -> np.ndarray:
    """Member ids of shard i of n: the i-th of n near-equal contiguous pieces of `run_order`, so a shard holds as
    few activation/optimizer slices as it can. Each slice costs its own kernels every step: 1,280 HYP members
    step in 1.35 ms with 4 activations x 2 optimizers and 1.28 ms with 2 x 2 (H100); 2-H200 HYP ranks took
    7.5 s per epoch with shards of every n-th member (4 x 2 each) and 6.5 s with contiguous ones (2 x 2).
    Pieces are equal in members, not in cost: tanh + relu trained 2.5 % faster than sigmoid + gelu (2 H200s)."""
    return np.sort(np.array_split(np.asarray(run_order(members, range(len(members)))), n)[i])


def plan_populations(members: Sequence[MemberSpec], ids: np.ndarray, cfg: ZooConfig, data: ImageData,
                     device: torch.device) -> np.ndarray:
    """Population id per member (-1 outside `ids`): groups of equal batch size, sorted by (activation,
    optimizer) so each is one slice of its population, cut to the population size that fits the budget."""
    budget = memory_budget(cfg, device)
    plan, next_id = np.full(len(members), -1, np.int64), 0
    groups: dict[tuple, list[int]] = {}
    for i in ids:
        m = members[i]
        groups.setdefault(m.batch_size, []).append(int(i))
    for batch, group in groups.items():
        group = run_order(members, group)
        cap = cfg.population_size or max(1, int(budget // member_bytes(model_spec(cfg, data).create("relu"),
                                                                        data.input_shape, batch)))
        if device.type == "cpu" and not cfg.population_size:
            cap = min(cap, CPU_POPULATION_CAP)
        n_pop = math.ceil(len(group) / cap)
        for chunk in np.array_split(np.asarray(group), n_pop):  # even sizes, no tiny tail
            plan[chunk] = next_id
            next_id += 1
    return plan


def _metric_names(cfg: ZooConfig) -> list[str]:
    names = ["train_loss", "train_acc", "test_loss", "test_acc"]
    names += ["val_loss", "val_acc"] if cfg.val_fraction > 0 else []
    if cfg.dataset == "sequence" and SequenceSpec.of(cfg.sequence).task.startswith("continual"):
        names += ["test_a_loss", "test_a_acc", "test_b_loss", "test_b_acc", "forgetting"]
    names += ["tether_merges", "tether_partner"] if cfg.tether_merge else []
    return names + (["sparsity"] if cfg.prune_epochs else [])


def _tether_merge(cfg: ZooConfig) -> TetherMerge | None:
    return TetherMerge(cfg.merge_loss_delta, cfg.merge_grad_norm, cfg.merge_compat, cfg.max_merges_per_epoch) \
        if cfg.tether_merge else None


def _switch(cfg: ZooConfig) -> int:
    """continual sequence data: the last epoch of task A (0 otherwise)."""
    return SequenceSpec.of(cfg.sequence).switch(cfg.epochs) if cfg.dataset == "sequence" else 0


def _open_partial(out: Path, cfg: ZooConfig, cfg_yaml: str, members, ids, data: ImageData, shard,
                  device) -> tuple[np.ndarray, np.ndarray, bool]:
    """Create the partial file, or check that an existing one is this build's; returns (plan, done, same)."""
    partial = partial_path(out)
    if partial.exists():
        try:
            with h5py.File(partial, "r") as f:
                plan = f["models/population"][:]  # a shard's members: the ones with a population
                same = same_zoo_config(yaml.safe_load(f.attrs["config"]), yaml.safe_load(cfg_yaml)) and \
                    f.attrs.get("shard") == f"{shard[0]}/{shard[1]}" and np.array_equal(np.flatnonzero(plan >= 0), ids)
                return plan, f["models/done"][:], same
        except (OSError, KeyError):
            raise UsageError(f"{partial} is not a readable partial zoo (truncated?); delete it or pass "
                             f"--overwrite to start again") from None
    plan = plan_populations(members, ids, cfg, data, device)
    attrs = {"input_mean": json.dumps(data.mean.tolist()), "input_std": json.dumps(data.std.tolist()),
             "shard": f"{shard[0]}/{shard[1]}"}
    ZooWriter.create(out, model_spec(cfg, data), members, cfg.checkpoints, _metric_names(cfg), dataset=cfg.dataset,
                     config=cfg_yaml, attrs=attrs, fields={"population": plan.astype(np.int32)}).close()
    return plan, np.zeros(len(members), bool), True


def build(cfg: ZooConfig, out: str | Path | None = None, overwrite: bool = False, shard: tuple[int, int] = (0, 1),
          max_populations: int | None = None, progress: bool = True, table: bool = True) -> Path | None:
    """Build (or resume) the zoo; returns its path, or None when stopped early by `max_populations`.
    `table=False` skips the Parquet table (torchrun's temporary shards: the joined zoo gets one).
    One build writes `out` at a time (an exclusive lock `OUT.lock`); the HDF5 rename is its commit point."""
    out = Path(out or cfg.out or f"data/zoos/{cfg.name}.h5")
    if out.suffix != ".h5":
        raise UsageError(f"output path {out} must end in .h5 (the Parquet table goes beside it)")
    if max_populations is not None and max_populations < 1:
        raise UsageError(f"--max-populations must be >= 1, got {max_populations}")
    check_new_output(out, overwrite, "zoo")
    device = resolve_device(cfg.device)
    members = expand_members(cfg)
    if not members:
        raise UsageError("the config expands to no members; give grid values or n_random >= 1")
    if device.type == "cuda" and device.index is not None:
        # torchrun rank r works on cuda:r: make it current, or CUDA-graph capture streams and Triton launches
        # go to cuda:0 (seen on 2 H200s: "operation not permitted when stream is capturing" on rank 1)
        torch.cuda.set_device(device)
    data = DataSpec.of(cfg).load(device)  # every check that can fail runs before anything is written
    model_spec(cfg, data).layout()  # fails early, with the reason, on shapes the architecture cannot take
    check_members(members, model_spec(cfg, data), data)
    absent = sorted({c for m in members for c in m.classes() or [] if c >= data.num_groups})
    if absent:
        raise UsageError(f"class_subset names class {absent[0]}, but dataset {cfg.dataset} has classes "
                         f"0..{data.num_groups - 1}")
    with output_lock(out):
        if overwrite and partial_path(out).exists():
            partial_path(out).unlink()
        return _build_locked(cfg, out, members, data, device, shard, max_populations, progress, table)


def _build_locked(cfg: ZooConfig, out: Path, members: list[MemberSpec], data: ImageData, device: torch.device, shard,
                  max_populations, progress: bool, table: bool) -> Path | None:
    ids = shard_ids(members, *shard)
    plan, done, same = _open_partial(out, cfg, to_yaml(cfg), members, ids, data, shard, device)
    if not same:
        raise UsageError(f"{partial_path(out)} holds an interrupted build with another config or shard; "
                         f"pass --overwrite to discard it, or rerun with the same config to resume")
    todo = [p for p in np.unique(plan[plan >= 0]) if not done[plan == p].all()]
    phases = dict.fromkeys(PHASES, 0.0)
    bar = tqdm(total=int(sum((plan == p).sum() for p in todo)) * cfg.epochs, unit="model-epoch",
               disable=not progress, desc=f"{cfg.name} on {device.type}", smoothing=0.1)
    writer = ZooWriter.resume(out, background=True)
    t0, trained = time.perf_counter(), 0
    try:
        for p in todo[:max_populations]:
            # laid out by (activation, optimizer): one slice each. In id order a random zoo's activations
            # alternate, and every run of one costs its own kernels (1,200 cnn_s trait members: 157 ms/step)
            pids = np.asarray(run_order(members, np.flatnonzero(plan == p)))
            t_setup = time.perf_counter()
            pop = Population(cfg.architecture, cfg.architecture_kwargs, [members[j] for j in pids], data,
                             cfg.prune_epochs, cfg.train_eval_samples, cfg.precision, cfg.compile,
                             eval_bytes(cfg, device), conv=cfg.conv, cuda_graphs=cfg.cuda_graphs, switch=_switch(cfg),
                             tether_merge=_tether_merge(cfg))
            sync(device)
            phases["setup"] += time.perf_counter() - t_setup
            train_and_record(pop, pids, cfg.checkpoints, writer, bar, phases)
            trained += len(pids)
    finally:
        bar.close()
        t_close = time.perf_counter()
        writer.close()
    if trained:
        _print_summary(trained, cfg, device, time.perf_counter() - t0, phases, time.perf_counter() - t_close)
    if max_populations is not None and len(todo) > max_populations:
        return None
    return writer.commit(table, required=plan >= 0)


def _print_summary(trained: int, cfg: ZooConfig, device, seconds: float, phases: dict, final: float) -> None:
    print(f"trained {trained} members x {cfg.epochs} epochs in {seconds:.1f} s on {device}: "
          f"{trained * cfg.epochs / seconds:.2f} model-epochs/s, {trained / seconds:.3f} members/s "
          f"(population setup {phases['setup']:.1f} s, train {phases['train']:.1f} s of which epoch 1 "
          f"{phases['epoch 1']:.1f} s, evaluate {phases['evaluate']:.1f} s of which epoch 0 "
          f"{phases['epoch 0']:.1f} s, checkpoint handoff {phases['checkpoint']:.1f} s, final write {final:.1f} s)")


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise UsageError(f"--shard must be i/n with 0 <= i < n, e.g. 0/4; got '{text}'") from None
    return i, n


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m zoo.build", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="YAML config (configs/zoo/*.yaml); default: the embedded digits zoo")
    ap.add_argument("--out", help="output .h5 path (default data/zoos/<name>.h5)")
    ap.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing zoo / discard a partial build")
    ap.add_argument("--shard", default="0/1",
                    help="build only shard i of n: the i-th of n equal pieces of the members in population order")
    ap.add_argument("--max-populations", type=int, help="stop after this many populations (resume later)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. epochs=5 grid.lr=[0.01]")
    args = ap.parse_intermixed_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    rank_gpu = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if world > 1 and torch.cuda.is_available() else None
    device = args.device or rank_gpu
    overrides = list(args.overrides) + ([f"device={device}"] if device else [])
    cfg = load_config(ZooConfig, args.config, overrides, None if args.config else DEFAULT_ZOO)
    if world > 1:
        return _main_distributed(cfg, args, rank, world)
    path = build(cfg, args.out, args.overwrite, _parse_shard(args.shard), args.max_populations, not args.quiet)
    print(f"zoo written to {path}" if path else "stopped early; rerun the same command to resume")


def _main_distributed(cfg: ZooConfig, args, rank: int, world: int) -> None:
    """Under torchrun: rank r builds shard r/world (one GPU each), then rank 0 merges the shards."""
    import torch.distributed as dist

    if args.shard != "0/1":
        raise UsageError("--shard and torchrun both split members; use one of them")
    out = Path(args.out or cfg.out or f"data/zoos/{cfg.name}.h5")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to rebuild it or choose another --out")
    shard_path = out.with_name(f"{out.stem}.shard{rank}of{world}.h5")
    dist.init_process_group("gloo")
    try:
        done = build(cfg, shard_path, args.overwrite, (rank, world), args.max_populations, not args.quiet and rank == 0,
                     table=False)
        dist.barrier()
        if rank == 0 and done is not None:
            shards = [out.with_name(f"{out.stem}.shard{r}of{world}.h5") for r in range(world)]
            join(out, shards, args.overwrite, consume=True)  # shard 0's file becomes the zoo
            for s in shards[1:]:
                s.unlink()
            print(f"zoo written to {out}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
