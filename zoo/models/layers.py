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
    """Multi-head self-attention; `causal` lets position t attend to positions <= t only (language models)."""

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        if dim % heads:
            raise UsageError(f"dim={dim} is not divisible by heads={heads}")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):  # (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, T, D/H)
        return self.out(y.transpose(1, 2).reshape(B, T, D))

    def extra_repr(self):
        return f"heads={self.heads}, causal={self.causal}"


class TokenEmbed(nn.Module):
    """Token ids -> vectors: a learned embedding per token plus a learned embedding per position."""

    def __init__(self, vocab: int, dim: int, block: int):
        super().__init__()
        self.tok = nn.Parameter(torch.zeros(vocab, dim))
        self.pos = nn.Parameter(torch.zeros(1, block, dim))

    def forward(self, x):  # (B, T) ids (floats are cast: shape probes pass zeros) -> (B, T, D)
        x = x.long()
        return self.tok[x] + self.pos[:, : x.shape[-1]]


class TiedHead(nn.Module):
    """Logits from the token embedding's own matrix (weight tying); holds no parameters of its own."""

    def __init__(self, embed: TokenEmbed, key: str):
        super().__init__()
        self._embed = [embed]  # a list: not a submodule, so the tied matrix is stored once
        self.key = key  # the embedding matrix's state_dict name, for the population engine

    def forward(self, x):  # (B, T, D) -> (B, T, vocab)
        return x @ self._embed[0].tok.T


class MemoryMLP(nn.Module):
    """A transformer block's MLP with `mem` extra hidden units beside its `hidden` ordinary ones.

    Memory neurons are units of their own (`mem_fc` in, `mem_proj` out) that differ from the ordinary ones in
    three ways: their output weights start at zero, so a block with memory computes what the plain block
    computes until training writes into it; their parameters learn at `lr x lr_scale` (the population engine
    scales the learning rate of any module with an `lr_scale`); and a member may use only the first
    `mem_neurons` of them (the rest are masked to zero), so one zoo holds members with different memory sizes.
    With mem = 0 the module has exactly the plain MLP's parameters and output."""

    def __init__(self, dim: int, hidden: int, mem: int, activation: str, dropout: float = 0.0,
                 lr_scale: float = 1.0):
        super().__init__()
        self.fc, self.act, self.proj = nn.Linear(dim, hidden), Activation(activation), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)
        self.mem = mem
        if mem:
            self.mem_fc, self.mem_proj = nn.Linear(dim, mem), nn.Linear(mem, dim)
            self.mem_fc.lr_scale = self.mem_proj.lr_scale = lr_scale

    def forward(self, x):  # (B, T, D)
        y = self.proj(self.act(self.fc(x)))
        if self.mem:
            y = y + self.mem_proj(self.act(self.mem_fc(x)))
        return self.drop(y)


class ClassToken(nn.Module):
    def forward(self, x):  # (B, T, D) -> (B, D)
        return x[..., 0, :]
