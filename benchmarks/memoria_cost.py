"""What Memoria costs in a population step: gpt_t members on the memorisation data (context 32 in 4 segments),
one training step timed for (a) no memory, (b) Memoria in one population (the network batched over members, one
Memoria memory per member: its batch elements are not independent, see zoo.models.SegmentedMemoria), (c) M
populations of one member, and a check that (b) and (c) compute the same logits (Memoria's random tie-breaking
between equally induced long-term memories fixed to the first, as only that differs).

    python benchmarks/memoria_cost.py                    # M = 8, 32 on the CPU
    python benchmarks/memoria_cost.py --members 8 --device cuda
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo import MemberSpec, Population  # noqa: E402
from zoo.sequences import SequenceSpec, make_sequences  # noqa: E402

KW = {"dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 2, "segment": 8}


def step_seconds(pop: Population, repeats: int = 3) -> float:
    order = pop.epoch_order(1)
    pop.run_steps(order, 1, range(1))  # warm-up
    t = time.perf_counter()
    pop.run_steps(order, 1, range(repeats))
    if pop.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    data = make_sequences(SequenceSpec(task="memorize", n_sequences=16, length=48, context=32)).to(args.device)
    for M in args.members:
        members = [MemberSpec(seed=i, lr=3e-3, activation="gelu", batch_size=8, class_subset=str(i % 16))
                   for i in range(M)]
        plain = step_seconds(Population("gpt_t", KW, members, data))
        torch.manual_seed(0)
        batched_pop = Population("gpt_t", {**KW, "memoria": True}, members, data)
        batched = step_seconds(batched_pop)
        singles = [Population("gpt_t", {**KW, "memoria": True}, [m], data) for m in members]
        per_member = sum(step_seconds(p, 1) for p in singles)
        x = data.x_test[:8]
        rand_like, torch.rand_like = torch.rand_like, lambda t, **k: torch.full_like(t, 0.5, **k)
        with torch.no_grad():
            a = batched_pop.forward(x[:, None], train=False)
            b = torch.cat([p.forward(x[:, None], train=False, params=batched_pop.net.views(batched_pop.flat[i:i + 1]))
                           for i, p in enumerate(singles)], 1)
        torch.rand_like = rand_like
        print(f"M={M}: step without memory {plain * 1e3:.0f} ms, with Memoria in one population "
              f"{batched * 1e3:.0f} ms ({batched / plain:.1f}x), M populations of one {per_member * 1e3:.0f} ms "
              f"(one population is {per_member / batched:.1f}x faster); max |logit diff| "
              f"{float((a - b).abs().max()):.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
