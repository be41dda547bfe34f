"""Architecture registry: `create_model(name, **kwargs)` builds a plain `nn.Module` for one member.

Every architecture is built from the layer types in this file (plus `nn.Conv2d`, `nn.Linear`,
`nn.MaxPool2d`, `nn.LayerNorm`, `nn.Dropout`, `nn.Flatten`, `nn.Sequential`), so the population
trainer (`zoo/population.py`) can run many members of it at once from the same definition.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._config import UsageError

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
}
INITS = ("uniform", "normal", "kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal",
         "orthogonal", "truncated_normal")
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class Activation(nn.Module):
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
            raise UsageError(f"vit_t: dim={dim} is not divisible by heads={heads}")
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


def register(name: str):
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"architecture '{name}' is registered twice")
        _REGISTRY[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _flat_features(features: nn.Module, in_channels: int, input_size: int, name: str) -> int:
    """Run a dummy image through the feature extractor: its output size, or a clear error."""
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, in_channels, input_size, input_size))
    except RuntimeError:
        out = None
    if out is None or out.numel() == 0:
        raise UsageError(f"architecture '{name}' cannot take input shape ({in_channels}, {input_size}, "
                         f"{input_size}); use a larger image (dataset option resize=28) or another architecture")
    return out.numel()


@register("cnn_s")
def cnn_s(in_channels=1, input_size=28, num_classes=10, activation="tanh", dropout=0.0):
    """Schürholt et al.'s small CNN (2,464 parameters for 1x28x28): conv -> pool -> act -> dropout."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 8, 5), nn.MaxPool2d(2), Activation(activation), nn.Dropout(dropout),
        nn.Conv2d(8, 6, 5), nn.MaxPool2d(2), Activation(activation), nn.Dropout(dropout),
        nn.Conv2d(6, 4, 2), Activation(activation), nn.Flatten(),
    )
    n = _flat_features(features, in_channels, input_size, "cnn_s")
    return nn.Sequential(*features, nn.Linear(n, 20), Activation(activation), nn.Dropout(dropout),
                         nn.Linear(20, num_classes))


@register("cnn_l")
def cnn_l(in_channels=1, input_size=28, num_classes=10, activation="tanh", dropout=0.0):
    """Schürholt et al.'s larger CNN: three 3x3 convs (16, 32, 15 channels), each with a 2x2 max-pool."""
    layers: list[nn.Module] = []
    for c_in, c_out in [(in_channels, 16), (16, 32), (32, 15)]:
        layers += [nn.Conv2d(c_in, c_out, 3), nn.MaxPool2d(2), Activation(activation), nn.Dropout(dropout)]
    features = nn.Sequential(*layers, nn.Flatten())
    n = _flat_features(features, in_channels, input_size, "cnn_l")
    return nn.Sequential(*features, nn.Linear(n, 20), Activation(activation), nn.Dropout(dropout),
                         nn.Linear(20, num_classes))


@register("cnn_gap")
def cnn_gap(in_channels=1, input_size=28, num_classes=10, activation="relu", dropout=0.0, width=16):
    """Unterthiner et al.'s Small-CNN-Zoo net: three 3x3 stride-2 convs, global average pool, dense."""
    layers: list[nn.Module] = []
    for c_in in [in_channels, width, width]:
        layers += [nn.Conv2d(c_in, width, 3, stride=2, padding=1), Activation(activation), nn.Dropout(dropout)]
    features = nn.Sequential(*layers, GlobalAvgPool())
    _flat_features(features, in_channels, input_size, "cnn_gap")
    return nn.Sequential(*features, nn.Linear(width, num_classes))


@register("mlp")
def mlp(in_channels=1, input_size=28, num_classes=10, activation="relu", dropout=0.0, widths=(64, 32)):
    """Fully connected net on the flattened image; `widths` are the hidden layer sizes."""
    sizes = [in_channels * input_size * input_size, *widths]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), Activation(activation), nn.Dropout(dropout)]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], num_classes))


@register("vit_t")
def vit_t(in_channels=1, input_size=28, num_classes=10, activation="gelu", dropout=0.0,
          patch=7, dim=32, depth=2, heads=2, mlp_ratio=2):
    """A tiny pre-norm ViT: patch embedding + class token, `depth` blocks, LayerNorm, linear head."""
    if input_size % patch:
        raise UsageError(f"vit_t: input_size={input_size} is not divisible by patch={patch}; "
                         f"set architecture_kwargs.patch to a divisor or resize the dataset")
    layers: list[nn.Module] = [PatchEmbed(in_channels, dim, patch, (input_size // patch) ** 2)]
    for _ in range(depth):
        layers.append(Residual(nn.LayerNorm(dim), SelfAttention(dim, heads), nn.Dropout(dropout)))
        layers.append(Residual(nn.LayerNorm(dim), nn.Linear(dim, mlp_ratio * dim), Activation(activation),
                               nn.Dropout(dropout), nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout)))
    return nn.Sequential(*layers, nn.LayerNorm(dim), ClassToken(), nn.Linear(dim, num_classes))


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise UsageError(f"unknown architecture '{name}'; registered: {', '.join(list_models())}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise UsageError(f"architecture '{name}': {e}") from None


def init_weights(model: nn.Module, init: str, scale: float, generator: torch.Generator) -> nn.Module:
    """Seeded init: `init` on every conv/linear weight (times `scale`), biases 0.01, LayerNorm (1, 0),
    ViT class token and positions N(0, 0.02). uniform/normal are torch's U(0, 1)/N(0, 1), as in Model Zoos."""
    if init not in INITS:
        raise UsageError(f"unknown init '{init}'; choose one of {', '.join(INITS)}")
    g = generator
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                if init == "truncated_normal":
                    nn.init.trunc_normal_(w, 0.0, 1.0, -2.0, 2.0, generator=g)
                elif init == "orthogonal":
                    nn.init.orthogonal_(w, generator=g)
                else:
                    getattr(nn.init, init + "_")(w, generator=g)
                w.mul_(scale)
                if m.bias is not None:
                    m.bias.fill_(0.01)
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, PatchEmbed):
                nn.init.normal_(m.cls, 0.0, 0.02, generator=g)
                nn.init.normal_(m.pos, 0.0, 0.02, generator=g)
    return model


def param_layout(model: nn.Module) -> list[dict]:
    """[{name, shape, offset}] in state_dict order: where each tensor sits in the flat vector."""
    layout, offset = [], 0
    for name, t in model.state_dict().items():
        layout.append({"name": name, "shape": list(t.shape), "offset": offset})
        offset += t.numel()
    return layout


def n_params(layout: list[dict]) -> int:
    last = layout[-1]
    return last["offset"] + math.prod(last["shape"])


def flatten_state(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in model.state_dict().values()])


def unflatten(flat: torch.Tensor, layout: list[dict]) -> dict[str, torch.Tensor]:
    flat = torch.as_tensor(flat)
    return {e["name"]: flat[e["offset"]: e["offset"] + math.prod(e["shape"])].view(e["shape"]).clone()
            for e in layout}
