"""Augmentations of weight vectors: function-preserving permutations of hidden units, weight matching
to a reference, and token noise / erasing.

Permutations are found from the architecture itself: walking the registry model, every conv/linear
whose outputs reach the next conv/linear only through per-channel layers (pool, activation, dropout,
flatten, global pooling) forms a coupling; permuting its output units and the next layer's input units
the same way leaves the network's function unchanged. Residual streams, attention and LayerNorm end a
coupling (not permuted). A permutation is applied as one gather index over the flat vector.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from zoo.models import GlobalAvgPool, Residual, unflatten


@dataclass(frozen=True)
class Coupling:
    producer: tuple[str, ...]  # params whose dim 0 indexes the units (weight, bias)
    consumer: str  # weight whose dim 1 takes the units as inputs
    n_units: int
    block: int  # inputs per unit in the consumer (spatial positions after a flatten), else 1


def _flatten_sizes(template: nn.Module, input_shape) -> dict[int, int]:
    """Spatial size (H*W) entering each Flatten, by module id."""
    sizes: dict[int, int] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o: sizes.__setitem__(id(mod), math.prod(i[0].shape[2:])))
             for m in template.modules() if isinstance(m, nn.Flatten)]
    with torch.no_grad():
        template.eval()(torch.zeros(1, *input_shape))
    for h in hooks:
        h.remove()
    return sizes


def find_couplings(template: nn.Module, input_shape) -> list[Coupling]:
    sizes = _flatten_sizes(template, input_shape)
    out: list[Coupling] = []

    def walk(seq: nn.Sequential, prefix: str):
        pending, block = None, 1  # (producer name prefix, n_units), inputs per unit
        for name, m in seq.named_children():
            full = f"{prefix}{name}"
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if pending is not None and m.weight.shape[1] == pending[1] * block:
                    out.append(Coupling((f"{pending[0]}.weight", f"{pending[0]}.bias"), f"{full}.weight",
                                        pending[1], block))
                pending, block = (full, m.weight.shape[0]), 1
            elif isinstance(m, nn.Flatten):
                block = sizes.get(id(m), 1)
            elif isinstance(m, Residual):
                walk(m.body, f"{full}.body.")
                pending = None
            elif isinstance(m, nn.Sequential):
                walk(m, f"{full}.")
                pending = None
            elif not isinstance(m, (nn.MaxPool2d, nn.Dropout, GlobalAvgPool)) and not hasattr(m, "fn"):
                pending = None  # LayerNorm, attention, patch embedding, class token: not permutable across
    walk(template, "")
    return out


class Permuter:
    """Random or given permutations of every coupling, as gather indices over the flat vector."""

    def __init__(self, layout: list[dict], couplings: list[Coupling]):
        self.layout, self.couplings = layout, couplings
        self.n_params = layout[-1]["offset"] + math.prod(layout[-1]["shape"])

    def index(self, perms: list[torch.Tensor]) -> torch.Tensor:
        """(P,) gather index: flat[index] is the network with coupling k's units permuted by perms[k]."""
        sd = unflatten(torch.arange(self.n_params), self.layout)
        for c, p in zip(self.couplings, perms):
            for name in c.producer:
                if name in sd:
                    sd[name] = sd[name].index_select(0, p)
            expanded = (p[:, None] * c.block + torch.arange(c.block)).reshape(-1)
            sd[c.consumer] = sd[c.consumer].index_select(1, expanded)
        return torch.cat([sd[e["name"]].reshape(-1) for e in self.layout])

    def random_index(self, generator: torch.Generator) -> torch.Tensor:
        return self.index([torch.randperm(c.n_units, generator=generator) for c in self.couplings])

    def align(self, flat: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Weight matching: per coupling in order, the unit permutation that best matches `reference`
        (Hungarian algorithm on the inner products of units' incoming weights)."""
        perms: list[torch.Tensor] = []
        for k, c in enumerate(self.couplings):
            cur = flat[self.index(perms + [torch.arange(x.n_units) for x in self.couplings[k:]])]
            a, b = unflatten(cur, self.layout), unflatten(reference, self.layout)
            rows = lambda sd: torch.cat([sd[n].reshape(c.n_units, -1) for n in c.producer if n in sd], 1)
            cost = (rows(a) @ rows(b).T).double().numpy()  # (member unit, reference unit)
            mem, ref = linear_sum_assignment(-cost)
            perms.append(torch.as_tensor(mem[np.argsort(ref)]))
        return flat[self.index(perms)]


def add_noise(tokens: torch.Tensor, mask: torch.Tensor, mult: float, add: float, generator=None) -> torch.Tensor:
    """Multiplicative and additive Gaussian noise on real (unmasked) token entries."""
    g = dict(generator=generator) if generator is not None else {}
    noisy = tokens * (1 + mult * torch.randn(tokens.shape, device=tokens.device, **g)) \
        + add * torch.randn(tokens.shape, device=tokens.device, **g)
    return torch.where(mask, noisy, tokens)


def erase_tokens(tokens: torch.Tensor, fraction: float, generator=None) -> torch.Tensor:
    """Random erasing: each token is zeroed with probability `fraction`. tokens (B, T, S)."""
    g = dict(generator=generator) if generator is not None else {}
    keep = torch.rand(tokens.shape[:-1], device=tokens.device, **g) >= fraction
    return tokens * keep[..., None]
