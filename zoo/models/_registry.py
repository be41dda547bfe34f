"""The architecture registry: `@register(name)` adds a builder, `create_model(name, **kwargs)` calls it."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..cli import UsageError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator: register a builder `fn(in_channels, input_size, num_classes, activation, dropout, **kw)`."""
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"architecture '{name}' is registered twice")
        _REGISTRY[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, tethered: bool = False, tether_scale: float = 0.5, **kwargs) -> nn.Module:
    """A fresh `nn.Module` of a registered architecture; unknown names and arguments fail with the name.
    `tethered=True` uses every conv / linear weight as W * T with a fixed per-member tether T (`tether.py`)."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown architecture '{name}'; registered: {', '.join(list_models())}")
    try:
        model = _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise UsageError(f"architecture '{name}': {e}") from None
    if tethered:
        if tether_scale < 0:
            raise UsageError(f"tether_scale must be >= 0, got {tether_scale}")
        from .tether import tether_layers
        model = tether_layers(model, tether_scale)
    return model


def flat_features(features: nn.Module, in_channels: int, input_size: int, name: str) -> int:
    """Run a dummy image through a feature extractor: its output size, or a clear error."""
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, in_channels, input_size, input_size))
    except RuntimeError:
        out = None
    if out is None or out.numel() == 0:
        raise UsageError(f"architecture '{name}' cannot take input shape ({in_channels}, {input_size}, "
                         f"{input_size}); use a larger image (dataset option resize=28) or another architecture")
    return out.numel()
