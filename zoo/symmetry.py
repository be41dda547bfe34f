"""Function-preserving permutations of hidden units, and weight matching (for augmentation, alignment
and model merging).

Permutations are found from the architecture itself: walking the registry model, every conv/linear whose
outputs reach the next conv/linear only through per-channel layers (pool, activation, dropout, flatten,
global pooling) forms a coupling, as do a transformer MLP's hidden units and its memory neurons
(`MemoryMLP`); permuting its output units and the next layer's input units the same way
leaves the network's function unchanged. Residual streams, attention and LayerNorm end a coupling (not
permuted). A permutation is applied as one gather index over the flat vector.

    perm = Permuter.of(spec)                                   # spec: zoo.ModelSpec
    flat[perm.random_index(generator)]                         # the same function, units shuffled
    perm.align(flat, reference)                                # weight matching onto a reference member
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from .models import Activation, GlobalAvgPool, MemoryMLP, Residual
from .spec import Layout, ModelSpec

# layers a unit passes through unchanged (per channel): a coupling continues across them
_PER_CHANNEL = (nn.MaxPool2d, nn.Dropout, GlobalAvgPool, Activation)


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
    """Every (producer, consumer) pair of layers whose shared units may be permuted without changing the function."""
    sizes = _flatten_sizes(template, input_shape)
    out: list[Coupling] = []

    def walk(seq: nn.Sequential, prefix: str):
        pending, block = None, 1  # (producer name prefix, n_units), inputs per unit
        for name, m in seq.named_children():
            full = f"{prefix}{name}"
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if pending is not None and m.weight.shape[1] == pending[1] * block:  # a tether moves with its weight
                    out.append(Coupling((f"{pending[0]}.weight", f"{pending[0]}.bias", f"{pending[0]}.tether"),
                                        f"{full}.weight", pending[1], block))
                pending, block = (full, m.weight.shape[0]), 1
            elif isinstance(m, nn.Flatten):
                block = sizes.get(id(m), 1)
            elif isinstance(m, MemoryMLP):  # hidden units and memory neurons: two couplings inside the block
                out.append(Coupling((f"{full}.fc.weight", f"{full}.fc.bias"), f"{full}.proj.weight",
                                    m.fc.out_features, 1))
                if m.mem:
                    out.append(Coupling((f"{full}.mem_fc.weight", f"{full}.mem_fc.bias"), f"{full}.mem_proj.weight",
                                        m.mem, 1))
                pending = None
            elif isinstance(m, Residual):
                walk(m.body, f"{full}.body.")
                pending = None
            elif isinstance(m, nn.Sequential):
                walk(m, f"{full}.")
                pending = None
            elif not isinstance(m, _PER_CHANNEL):
                pending = None  # LayerNorm, attention, patch embedding, class token: not permutable across
    walk(template, "")
    return out


class Permuter:
    """Random or given permutations of every coupling, as gather indices over the flat vector."""

    def __init__(self, layout: Layout, couplings: list[Coupling]):
        self.layout, self.couplings = layout, couplings
        self.n_params = layout.n_params

    @classmethod
    def of(cls, spec: ModelSpec) -> "Permuter":
        template = spec.create()
        return cls(Layout.of(template), find_couplings(template, spec.input_shape))

    def index(self, perms: list[torch.Tensor]) -> torch.Tensor:
        """(P,) gather index: flat[index] is the network with coupling k's units permuted by perms[k]."""
        sd = self.layout.unflatten(torch.arange(self.n_params))
        for c, p in zip(self.couplings, perms):
            for name in c.producer:
                if name in sd:
                    sd[name] = sd[name].index_select(0, p)
            expanded = (p[:, None] * c.block + torch.arange(c.block)).reshape(-1)
            for name in (c.consumer, c.consumer.removesuffix("weight") + "tether"):  # tethered: T moves with W
                if name in sd:
                    sd[name] = sd[name].index_select(1, expanded)
        return self.layout.flatten(sd)

    def random_perms(self, generator: torch.Generator) -> list[torch.Tensor]:
        return [torch.randperm(c.n_units, generator=generator) for c in self.couplings]

    def random_index(self, generator: torch.Generator) -> torch.Tensor:
        return self.index(self.random_perms(generator))

    def _unit_rows(self, flat: torch.Tensor, c: Coupling) -> torch.Tensor:
        """(n_units, fan_in + 1): each unit's incoming weights and bias."""
        sd = {n: self.layout.tensor(flat, n) for n in c.producer if n in self.layout.names and not n.endswith("tether")}
        return torch.cat([t.reshape(c.n_units, -1) for t in sd.values()], 1)

    def match_perms(self, flat: torch.Tensor, reference: torch.Tensor) -> list[torch.Tensor]:
        """Weight matching: per coupling in order, the unit permutation of `flat` that best matches `reference`
        (Hungarian algorithm on inner products of units' incoming weights, after the earlier couplings'
        permutations are applied, so a unit's inputs are already in the reference's order)."""
        perms: list[torch.Tensor] = []
        for k, c in enumerate(self.couplings):
            cur = flat[self.index(perms + [torch.arange(x.n_units) for x in self.couplings[k:]])]
            cost = (self._unit_rows(cur, c) @ self._unit_rows(reference, c).T).double().numpy()  # (member, reference)
            mem, ref = linear_sum_assignment(-cost)
            perms.append(torch.as_tensor(mem[np.argsort(ref)]))
        return perms

    def align(self, flat: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """`flat` with its units permuted to match `reference` (weight matching); the function is unchanged."""
        return flat[self.index(self.match_perms(flat, reference))]
