"""Fully connected networks."""
from __future__ import annotations

import torch.nn as nn

from ._registry import register
from .layers import Activation


@register("mlp")
def mlp(in_channels=1, input_size=28, num_classes=10, activation="relu", dropout=0.0, widths=(64, 32)):
    """Fully connected net on the flattened image; `widths` are the hidden layer sizes."""
    sizes = [in_channels * input_size * input_size, *widths]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), Activation(activation), nn.Dropout(dropout)]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], num_classes))
