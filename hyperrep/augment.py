"""Token augmentations: multiplicative/additive noise and random erasing. (Function-preserving permutations
and weight matching live in `zoo.symmetry`, shared with model merging.)"""
from __future__ import annotations

import torch


def add_noise(tokens: torch.Tensor, mask: torch.Tensor, mult: float, add: float, generator=None) -> torch.Tensor:
    """Multiplicative and additive Gaussian noise on real (unmasked) token entries."""
    g = dict(generator=generator) if generator is not None else {}
    noisy = tokens * (1 + mult * torch.randn(tokens.shape, device=tokens.device, **g)) \
        + add * torch.randn(tokens.shape, device=tokens.device, **g)
    return torch.where(mask, noisy, tokens)


def erase_tokens(tokens: torch.Tensor, fraction: float, generator=None) -> torch.Tensor:
    """Random erasing: each token is zeroed with probability `fraction`. tokens (B, T, S)."""
    g = dict(generator=generator) if generator is not None else {}
    keep = torch.rand(tokens.shape[:-1], device=tokens.device, **g) >= fraction
    return tokens * keep[..., None]
