"""Tethered layers: every conv / linear weight is used as `W * T`, with T a fixed tether tensor of its shape
(a buffer: stored with the member, never trained), drawn per member from its seed as 1 + tether_scale * N(0, 1).
`create_model(name, tethered=True, tether_scale=s)` tethers any registry architecture. Two members' tether
compatibility is the sum over all tether entries of T_i * T_j (`compatibility`); a build can merge the tethers of
compatible members that have stopped learning (`zoo.population.TetherMerge`, `choose_merges`)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Tethered:
    """Mixin: a fixed tether buffer of the weight's shape (all ones until `init_weights` draws it)."""

    def _add_tether(self, scale: float) -> None:
        self.tether_scale = scale
        self.register_buffer("tether", torch.ones_like(self.weight))


class TetheredLinear(_Tethered, nn.Linear):
    def __init__(self, *args, tether_scale: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_tether(tether_scale)

    def forward(self, x):
        return F.linear(x, self.weight * self.tether, self.bias)


class TetheredConv2d(_Tethered, nn.Conv2d):
    def __init__(self, *args, tether_scale: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_tether(tether_scale)

    def forward(self, x):
        return self._conv_forward(x, self.weight * self.tether, self.bias)


TETHERED = (TetheredLinear, TetheredConv2d)


def tether_layers(model: nn.Module, scale: float) -> nn.Module:
    """Replace every nn.Linear / nn.Conv2d of `model` by its tethered twin (same parameters, all-ones tether)."""
    for name, child in list(model.named_children()):
        if type(child) is nn.Linear:
            new = TetheredLinear(child.in_features, child.out_features, child.bias is not None, tether_scale=scale)
        elif type(child) is nn.Conv2d:
            new = TetheredConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                 child.padding, child.dilation, child.groups, child.bias is not None,
                                 child.padding_mode, tether_scale=scale)
        else:
            tether_layers(child, scale)
            continue
        new.load_state_dict(child.state_dict(), strict=False)
        setattr(model, name, new)
    return model


def compatibility(tethers_a: torch.Tensor, tethers_b: torch.Tensor) -> torch.Tensor:
    """(M, n) and (N, n) flat tether entries -> (M, N) sums of T_i * T_j over entries."""
    return tethers_a @ tethers_b.T
