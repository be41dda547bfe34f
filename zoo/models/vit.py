"""Tiny vision transformers."""
from __future__ import annotations

import torch.nn as nn

from ..cli import UsageError
from ._registry import register
from .layers import Activation, ClassToken, PatchEmbed, Residual, SelfAttention


@register("vit_t")
def vit_t(in_channels=1, input_size=28, num_classes=10, activation="gelu", dropout=0.0,
          patch=7, dim=32, depth=2, heads=2, mlp_ratio=2):
    """A tiny pre-norm ViT: patch embedding + class token, `depth` blocks, LayerNorm, linear head."""
    if input_size % patch:
        raise UsageError(f"vit_t: input_size={input_size} is not divisible by patch={patch}; "
                         f"set architecture_kwargs.patch to a divisor or resize the dataset")
    if dim % heads:
        raise UsageError(f"vit_t: dim={dim} is not divisible by heads={heads}")
    layers: list[nn.Module] = [PatchEmbed(in_channels, dim, patch, (input_size // patch) ** 2)]
    for _ in range(depth):
        layers.append(Residual(nn.LayerNorm(dim), SelfAttention(dim, heads), nn.Dropout(dropout)))
        layers.append(Residual(nn.LayerNorm(dim), nn.Linear(dim, mlp_ratio * dim), Activation(activation),
                               nn.Dropout(dropout), nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout)))
    return nn.Sequential(*layers, nn.LayerNorm(dim), ClassToken(), nn.Linear(dim, num_classes))
