"""Tokenization of flat weight vectors: one token per output neuron / channel, split into chunks.

A unit's token is its incoming weights and its bias, flattened (for conv: C_in x k x k weights + bias).
Tokens longer than `token_size` are split into chunks; the last chunk is zero-padded and masked. Each
token has a 3-D position: (global index, layer index, index within layer). The map is a gather index
into the flat vector, so tokenize -> detokenize is exact (bitwise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zoo import Layout, TensorEntry


def layer_groups(layout: Layout) -> list[list[TensorEntry]]:
    """Consecutive layout entries of one module (e.g. '3.weight', '3.bias') form a layer."""
    groups: list[list[TensorEntry]] = []
    for e in layout:
        if groups and groups[-1][0].module == e.module and e.kind in ("weight", "bias"):
            groups[-1].append(e)
        else:
            groups.append([e])
    return groups


def _unit_rows(group: list[TensorEntry]) -> list[list[int]]:
    """Flat indices of each unit's values: weight/bias tensors are split along dim 0; any other tensor
    (class token, positions) along all but its last dim."""
    first = group[0]
    if first.kind in ("weight", "bias"):
        n_units = first.shape[0]
        rows = [[] for _ in range(n_units)]
        for e in group:
            per = math.prod(e.shape[1:])
            for u in range(n_units):
                rows[u].extend(range(e.offset + u * per, e.offset + (u + 1) * per))
        return rows
    last = first.shape[-1]
    n_units = first.size // last
    return [list(range(first.offset + u * last, first.offset + (u + 1) * last)) for u in range(n_units)]


@dataclass(frozen=True)
class Tokenizer:
    """index (T, token_size) int64 gather map into the flat vector (-1 = padding); positions (T, 3)."""
    index: torch.Tensor
    positions: torch.Tensor
    n_params: int
    token_size: int

    @classmethod
    def from_layout(cls, layout: Layout, token_size: int) -> "Tokenizer":
        if token_size < 1:
            raise ValueError(f"token_size must be >= 1, got {token_size}")
        rows, pos = [], []
        for layer, group in enumerate(layer_groups(layout)):
            within = 0
            for unit in _unit_rows(group):
                for a in range(0, len(unit), token_size):
                    chunk = unit[a:a + token_size]
                    rows.append(chunk + [-1] * (token_size - len(chunk)))
                    pos.append((len(pos), layer, within))
                    within += 1
        return cls(torch.tensor(rows), torch.tensor(pos), layout.n_params, token_size)

    @property
    def n_tokens(self) -> int:
        return len(self.index)

    @property
    def mask(self) -> torch.Tensor:
        """(T, token_size) bool: True where a token holds a real weight."""
        return self.index >= 0

    def tokenize(self, flat: torch.Tensor) -> torch.Tensor:
        """(..., P) -> (..., T, token_size), padding zero."""
        gathered = flat[..., self.index.clamp(min=0).to(flat.device)]
        return torch.where(self.mask.to(flat.device), gathered, torch.zeros((), dtype=flat.dtype, device=flat.device))

    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., T, token_size) -> (..., P): the exact inverse of `tokenize`."""
        mask, idx = self.mask.to(tokens.device), self.index.to(tokens.device)
        flat = torch.zeros(*tokens.shape[:-2], self.n_params, dtype=tokens.dtype, device=tokens.device)
        flat[..., idx[mask]] = tokens[..., mask]
        return flat
