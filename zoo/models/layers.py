"""Layer types the registry's architectures are built from, besides `nn.Conv2d`, `nn.Linear`, `nn.MaxPool2d`,
`nn.LayerNorm`, `nn.Dropout`, `nn.Flatten` and `nn.Sequential`. Each has a rule in the population engine
(`zoo.engine`), so many members of any registered architecture train at once from the same definition."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cli import UsageError

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
}


class Activation(nn.Module):
    """A named elementwise activation (the member's hyperparameter `activation`)."""

    def __init__(self, name: str):
        super().__init__()
        if name not in ACTIVATIONS:
            raise UsageError(f"unknown activation '{name}'; choose one of {', '.join(ACTIVATIONS)}")
        self.name = name
        self.fn = ACTIVATIONS[name]

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self):
        return self.name


class GlobalAvgPool(nn.Module):
    def forward(self, x):  # (B, C, H, W) -> (B, C)
        return x.mean(dim=(-2, -1))


class Residual(nn.Module):
    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.body(x)


class PatchEmbed(nn.Module):
    """Image -> tokens: a strided conv, a learned class token in front, learned positions added."""

    def __init__(self, in_channels: int, dim: int, patch: int, n_patches: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, n_patches + 1, dim))

    def forward(self, x):  # (B, C, H, W) -> (B, 1 + P, D)
        t = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1) + self.pos


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise UsageError(f"dim={dim} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):  # (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D/H)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class ClassToken(nn.Module):
    def forward(self, x):  # (B, T, D) -> (B, D)
        return x[..., 0, :]
