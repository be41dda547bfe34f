"""Seeded initialisation of a member's weights, and flat-vector helpers."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..cli import UsageError
from .layers import MemoryMLP, PatchEmbed, TokenEmbed
from .tether import TETHERED

INITS = ("uniform", "normal", "kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal",
         "orthogonal", "truncated_normal")


def init_weights(model: nn.Module, init: str, scale: float, generator: torch.Generator) -> nn.Module:
    """Seeded init: `init` on every conv/linear weight (times `scale`), biases 0.01, LayerNorm (1, 0),
    ViT class token, token and position embeddings N(0, 0.02), memory neurons' output weights 0.
    uniform/normal are torch's U(0, 1)/N(0, 1), as in Model Zoos."""
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
            elif isinstance(m, TokenEmbed):
                nn.init.normal_(m.tok, 0.0, 0.02, generator=g)
                nn.init.normal_(m.pos, 0.0, 0.02, generator=g)
        for m in model.modules():
            if isinstance(m, TETHERED):  # the member's own tether, from its seed
                m.tether.normal_(1.0, m.tether_scale, generator=g)
        for m in model.modules():  # after the Linear pass: memory neurons start silent
            if isinstance(m, MemoryMLP) and m.mem:
                m.mem_proj.weight.zero_()
                m.mem_proj.bias.zero_()
    return model


def flatten_state(model: nn.Module) -> torch.Tensor:
    """A module's state_dict as one flat vector, in state_dict order (its `Layout`)."""
    return torch.cat([t.reshape(-1) for t in model.state_dict().values()])
