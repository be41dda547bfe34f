"""The plain per-model PyTorch loop: one `nn.Module`, one `torch.optim` optimizer, one member.

It is the reference the population trainer must match (same seed, same batches) and the baseline
the benchmarks compare against. It draws batches from the same counter-based order as the
population, so dropout aside (torch's own RNG here), the two compute the same thing.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MemberSpec
from .data import ImageData
from .engine import sample_loss
from .population import init_member, member_order, member_pools, noisy_labels, spec_for

_OPTIMIZERS = {
    "adam": lambda ps, m: torch.optim.Adam(ps, lr=m.lr, weight_decay=m.weight_decay),
    "sgd": lambda ps, m: torch.optim.SGD(ps, lr=m.lr, momentum=0.9, weight_decay=m.weight_decay),
    "rmsprop": lambda ps, m: torch.optim.RMSprop(ps, lr=m.lr, weight_decay=m.weight_decay),
}


def _param_groups(model: nn.Module, lr: float) -> list[dict]:
    """One group per learning rate: modules with an `lr_scale` (memory neurons) learn at lr x lr_scale."""
    groups: dict[float, list] = {}
    for mod in model.modules():
        scale = getattr(mod, "lr_scale", 1.0)
        groups.setdefault(scale, []).extend(mod.parameters(recurse=False))
    return [{"params": ps, "lr": lr * scale} for scale, ps in groups.items() if ps]


def build_member(architecture: str, architecture_kwargs: dict, m: MemberSpec, data: ImageData) -> nn.Module:
    spec = spec_for(architecture, architecture_kwargs, data)
    return init_member(lambda: spec.create(m.activation, m.dropout), m).to(data.x_train.device)


def train_solo(architecture: str, architecture_kwargs: dict, m: MemberSpec, data: ImageData, epochs: int,
               max_steps: int | None = None, precision: str = "fp32") -> nn.Module:
    """Train one member for `epochs` epochs (or `max_steps` steps) with a plain loop; precision="bf16"
    runs forward and backward under bf16 autocast (fp32 weights and optimizer), as the population does."""
    model = build_member(architecture, architecture_kwargs, m, data).train()
    opt = _OPTIMIZERS[m.optimizer](_param_groups(model, m.lr), m)
    seed = torch.tensor([m.seed], device=data.x_train.device)  # label noise
    order_seed = torch.tensor([m.order_seed], device=seed.device)  # data order
    pool = member_pools([m], data.groups("train"))
    n_steps = int(pool.sum() if pool is not None else len(data.y_train)) // m.batch_size
    steps = 0
    for epoch in range(1, epochs + 1):
        order = member_order(order_seed, epoch, len(data.y_train), pool)[0]
        for s in range(n_steps):
            idx = order[s * m.batch_size:(s + 1) * m.batch_size]
            with torch.autocast(seed.device.type, torch.bfloat16, enabled=precision == "bf16"):
                logits = model(data.normalize(data.x_train[idx]))
            if data.label_dims:  # sequences: per-position targets, -1 where no loss is taken
                loss = sample_loss(logits.float()[:, None], data.y_train[idx][:, None]).mean()
            else:
                y = noisy_labels(data.y_train, idx[None], seed, torch.tensor([m.label_noise], device=seed.device),
                                 data.num_classes)[0]
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return model
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data: ImageData, split: str = "test", batch: int = 1024) -> float:
    x, y = (data.x_test, data.y_test) if split == "test" else (data.x_train, data.y_train)
    model.eval()
    correct = sum(int((model(data.normalize(x[a:a + batch])).argmax(1) == y[a:a + batch]).sum())
                  for a in range(0, len(x), batch))
    return correct / len(x)
