"""Memorisation, grokking and forgetting per memory kind in the sequence zoos, with 95 % intervals over members
(each member its own seed): the table of benchmarks/SEQUENCES.md.

    python benchmarks/sequence_table.py data/zoos/seq_memory.h5 data/zoos/seq_modular.h5 data/zoos/seq_continual.h5
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import zoo  # noqa: E402
from zoo.sequences import SequenceSpec  # noqa: E402


def interval(v: np.ndarray, n_boot: int = 2000) -> str:
    """mean [95 % bootstrap interval] over members."""
    v = v[np.isfinite(v)]
    if not len(v):
        return "-"
    means = np.random.default_rng(0).choice(v, (n_boot, len(v))).mean(1)
    return f"{v.mean():.3f} [{np.quantile(means, 0.025):.3f}, {np.quantile(means, 0.975):.3f}] (n={len(v)})"


def rows(path: str) -> list[str]:
    with zoo.open(path) as z:
        task = (z.config.get("sequence") or {}).get("task", "memorize")
        ok = z.usable()
        mem = z.field("mem_neurons").astype(np.int64)
        if z.architecture_kwargs.get("memoria"):  # memory kind = (memory neurons, Memoria on): one code
            mem = mem * 2 + z.field("memoria").astype(np.int64)
        wd = z.field("weight_decay")
        task = "continual" if task.startswith("continual") else task
        metrics = {"memorize": ["test_acc"], "modular": ["train_acc", "test_acc"],
                   "continual": ["test_a_acc", "test_b_acc", "forgetting"]}[task]
        out = []
        for kind in sorted(set(mem[ok].tolist())):
            sel = ok & (mem == kind)
            cells = [interval(z.metric(m)[sel, -1]) for m in metrics]
            if task == "modular":
                cells.append(interval((z.metric("test_acc")[sel, -1] >= 0.9).astype(float)))
            if task == "continual":  # task A right before the switch (the checkpoint at the switch epoch)
                switch = SequenceSpec.of(z.config["sequence"]).switch(z.config["epochs"])
                slot = [int(e) for e in z.epochs].index(switch) if switch in list(z.epochs) else None
                cells.insert(0, interval(z.metric("test_a_acc")[sel, slot]) if slot is not None else "-")
            n, on = (kind // 2, kind % 2) if z.architecture_kwargs.get("memoria") else (kind, 0)
            label = ("none" if n == 0 else f"{n} memory neurons" if n > 0 else "all memory neurons") + \
                (" + Memoria" if on else "")
            out.append(f"| {z.path.stem} | {label} | " + " | ".join(cells) + " |")
        if task == "modular":  # grokking against weight decay, every memory kind together
            for lo, hi in ((0, 0.01), (0.01, 0.1), (0.1, 10)):
                sel = ok & (wd >= lo) & (wd < hi)
                out.append(f"| {z.path.stem} | wd in [{lo}, {hi}) | {interval(z.metric('train_acc')[sel, -1])} | "
                           f"{interval(z.metric('test_acc')[sel, -1])} | "
                           f"{interval((z.metric('test_acc')[sel, -1] >= 0.9).astype(float))} |")
        return out, metrics, task


if __name__ == "__main__":
    for path in sys.argv[1:]:
        lines, metrics, task = rows(path)
        task = "continual" if task.startswith("continual") else task
        head = (["task A acc at the switch"] if task == "continual" else []) + metrics + \
            (["grokked (test_acc >= 0.9)"] if task == "modular" else [])
        print(f"\n| zoo | memory | {' | '.join(head)} |\n|---|---|{'---|' * len(head)}")
        print("\n".join(lines))
