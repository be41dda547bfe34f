"""Tiny causal transformers (minGPT-style language models) for sequence zoos."""
from __future__ import annotations

import torch.nn as nn

from ..cli import UsageError
from ._registry import register
from .layers import MemoryMLP, MemoryRead, Residual, SegmentedMemoria, SelfAttention, TiedHead, TokenEmbed


@register("gpt_t")
def gpt_t(in_channels=1, input_size=16, num_classes=16, activation="gelu", dropout=0.0,
          dim=32, depth=2, heads=2, mlp_ratio=2, fc_mem_dim=0, mem_lr_scale=1.0, tied=False, block=0,
          memoria=False, segment=8, memoria_kwargs=None):
    """A tiny pre-norm causal transformer over token ids: token + position embedding, `depth` blocks of
    causal self-attention and an MLP with `fc_mem_dim` memory neurons (`MemoryMLP`; 0 = the standard block),
    a final LayerNorm and a head tied to the token embedding or not. In the zoo's terms: `input_size` is the
    context length T (the dataset's, unless `block` sets a longer position table), `num_classes` the
    vocabulary; logits come per position, (B, T, vocab). `memoria=True` cuts the context into segments of
    `segment` tokens (attention stays inside one) and inserts a Memoria memory after the first half of the blocks
    (`SegmentedMemoria`, package memoria-pytorch; `memoria_kwargs` overrides its settings): what crosses segments
    is what Memoria stores and reminds."""
    if dim % heads:
        raise UsageError(f"gpt_t: dim={dim} is not divisible by heads={heads}")
    if fc_mem_dim < 0 or mem_lr_scale <= 0:
        raise UsageError(f"gpt_t: fc_mem_dim must be >= 0 and mem_lr_scale > 0, got {fc_mem_dim}, {mem_lr_scale}")
    block = block or input_size
    if block < input_size:
        raise UsageError(f"gpt_t: block={block} is shorter than the context length {input_size}")
    embed = TokenEmbed(num_classes, dim, block)
    blocks: list[nn.Module] = []
    for _ in range(depth):
        blocks.append(Residual(nn.LayerNorm(dim), SelfAttention(dim, heads, causal=True), nn.Dropout(dropout)))
        blocks.append(Residual(nn.LayerNorm(dim), MemoryMLP(dim, mlp_ratio * dim, fc_mem_dim, activation, dropout,
                                                            mem_lr_scale)))
    if memoria:
        if not 1 <= segment <= input_size:
            raise UsageError(f"gpt_t: segment={segment} must lie in [1, context length {input_size}]")
        half = 2 * ((depth + 1) // 2)  # the first half of the blocks (two layers each) before the memory
        blocks = [SegmentedMemoria(nn.Sequential(*blocks[:half]), MemoryRead(dim), nn.Sequential(*blocks[half:]),
                                   segment, memoria_kwargs)]
    head = TiedHead(embed, "0.tok") if tied else nn.Linear(dim, num_classes)
    return nn.Sequential(embed, *blocks, nn.LayerNorm(dim), head)
