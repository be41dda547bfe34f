"""Architecture registry: `create_model(name, **kwargs)` builds a plain `nn.Module` for one member.

One file per family (`cnn.py`, `mlp.py`, `vit.py`, `gpt.py`); a new family registers its builders with
`@register(name)` and is imported here. Its layer types must have population-engine rules (`zoo.engine`):
`tests/test_models.py` checks that for every registered architecture.
"""
from . import cnn, gpt, mlp, vit  # noqa: F401  (registers the families)
from ._registry import create_model, list_models, register
from .init import INITS, flatten_state, init_weights
from .layers import (
                     ACTIVATIONS,
                     Activation,
                     ClassToken,
                     GlobalAvgPool,
                     MemoryMLP,
                     MemoryRead,
                     PatchEmbed,
                     Residual,
                     SegmentedMemoria,
                     SelfAttention,
                     TiedHead,
                     TokenEmbed,
)

__all__ = ["create_model", "list_models", "register", "INITS", "flatten_state", "init_weights", "ACTIVATIONS",
           "Activation", "ClassToken", "GlobalAvgPool", "MemoryMLP", "MemoryRead", "PatchEmbed", "Residual",
           "SegmentedMemoria", "SelfAttention", "TiedHead", "TokenEmbed"]
