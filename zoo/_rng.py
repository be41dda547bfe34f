"""Counter-based randomness: every random choice of a member is a hash of (seed, tag, index), so it is the
same on every device, alone or in any population."""
from __future__ import annotations

import torch

from ._triton import tl, triton

_MASK32 = 0xFFFFFFFF
TAG_SUBSET, TAG_NOISE, TAG_NOISE_LABEL, TAG_EVAL, TAG_DROPOUT = -1, -2, -3, -4, -5


def hash32(seed: torch.Tensor, tag: int, idx: torch.Tensor) -> torch.Tensor:
    """Counter-based hash -> int64 in [0, 2^32). Integer ops only: identical on every device."""
    h = (seed * 0x9E3779B1 + (tag + 16) * 0x85EBCA77 + idx * 0x2545F491) & _MASK32
    for _ in range(2):
        h = ((h >> 16) ^ h) * 0x45D9F3B & _MASK32
    return (h >> 16) ^ h


if triton is not None:
    @triton.jit
    def hash32_tl(seed, tag: tl.constexpr, idx):
        """`hash32` in a Triton kernel on int64 tensors: the same integers."""
        c = tl.full((1,), 0, tl.int64)  # int64 constants: the literals would type as (u)int32
        h = (seed * (c + 0x9E3779B1) + (c + (tag + 16) * 0x85EBCA77) + idx * (c + 0x2545F491)) & (c + 0xFFFFFFFF)
        h = (((h >> 16) ^ h) * (c + 0x45D9F3B)) & (c + 0xFFFFFFFF)
        h = (((h >> 16) ^ h) * (c + 0x45D9F3B)) & (c + 0xFFFFFFFF)
        return (h >> 16) ^ h

    @triton.jit
    def kept_tl(key, thr, elem):
        """The engine's dropout mask (`zoo.engine._dropout`) at int64 element indices `elem` of a member's
        (B, *features) activation (row-major over the logical shape): hash >= thr = ceil(rate 2^32)."""
        return hash32_tl(key, 0, elem ^ 0x5BD1E995) >= thr
