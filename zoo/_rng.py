"""Counter-based randomness: every random choice of a member is a hash of (seed, tag, index), so it is the
same on every device, alone or in any population."""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
TAG_SUBSET, TAG_NOISE, TAG_NOISE_LABEL, TAG_EVAL, TAG_DROPOUT = -1, -2, -3, -4, -5


def hash32(seed: torch.Tensor, tag: int, idx: torch.Tensor) -> torch.Tensor:
    """Counter-based hash -> int64 in [0, 2^32). Integer ops only: identical on every device."""
    h = (seed * 0x9E3779B1 + (tag + 16) * 0x85EBCA77 + idx * 0x2545F491) & _MASK32
    for _ in range(2):
        h = ((h >> 16) ^ h) * 0x45D9F3B & _MASK32
    return (h >> 16) ^ h
