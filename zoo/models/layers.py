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


def _memoria(kwargs: dict):
    try:
        from memoria import Memoria
    except ImportError:
        raise UsageError("memoria=true needs the package memoria-pytorch: pip install -e \".[memoria]\"") from None
    return Memoria(**kwargs)


class MemoryRead(nn.Module):
    """Cross-attention from a segment's hidden states (queries) to the memories Memoria reminded (keys,
    values), added to the residual stream; padding memories (index -1) get no weight."""

    def __init__(self, dim: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, h, mem, valid, linear=None):
        """h (..., T, D), mem (..., R, D), valid (..., R) -> (..., T, D), attention (..., T, R). `linear(name, t)`
        applies the q/k/v/o layer `name` (the population engine passes its per-member one)."""
        linear = linear or (lambda name, t: getattr(self, name)(t))
        if mem.shape[-2] == 0:
            return h, h.new_zeros(*h.shape[:-1], 0)
        scores = (linear("q", h) @ linear("k", mem).transpose(-1, -2)) * h.shape[-1] ** -0.5
        att = torch.softmax(scores.masked_fill(~valid.unsqueeze(-2), float("-inf")), -1).nan_to_num(0.0)
        return h + linear("o", att @ linear("v", mem)), att


MEMORIA_DEFAULTS = {"num_reminded_stm": 4, "stm_capacity": 16, "ltm_search_depth": 2, "initial_lifespan": 3,
                    "num_final_ltms": 4}


class SegmentedMemoria(nn.Module):
    """A context cut into segments of `segment` tokens, run one after another through the blocks `pre`, a
    Memoria memory, and the blocks `post` (attention stays inside a segment). After `pre`, each segment's hidden
    states become Memoria's working memory; `remind` returns the short- and long-term memories they recall, which
    `read` attends to; each recalled memory's lifespan grows by the attention it got (the paper's rule), then
    `adjust_lifespan_and_memories` ages, promotes and drops engrams. The memory lives for one forward pass (one
    context) and is not differentiated (engrams are detached hidden states); `read` learns to use it.

    One memory serves one member's batch: Memoria's batch elements are not independent (its engram tables are
    padded to the longest element, and short-term overflow is counted on that padded length), so putting members
    on its batch dimension would let members change each other's memories. The population engine keeps one
    memory per member (`members=M`) and batches everything else."""

    def __init__(self, pre: nn.Sequential, read: MemoryRead, post: nn.Sequential, segment: int,
                 memoria: dict | None = None):
        super().__init__()
        self.pre, self.read, self.post, self.segment = pre, read, post, segment
        self.memoria = {**MEMORIA_DEFAULTS, **(memoria or {})}

    def forward(self, x, run=None, members: int = 0):
        """x (B, L, D), or (B, M, L, D) with `members` = M memories (the engine, whose `run(part, x, ...)` runs
        a part with each member's parameters) -> the same shape."""
        run = run or (lambda part, t, *a: part(t, *a))
        memories, outs = [_memoria(self.memoria) for _ in range(max(members, 1))], []
        for a in range(0, x.shape[-2], self.segment):
            h = run(self.pre, x[..., a:a + self.segment, :])
            outs.append(run(self.post, self.recall(memories, h, run, members > 0)))
        return torch.cat(outs, -2)

    def recall(self, memories, h, run, stacked: bool):
        """One segment through the memories: h (B, T, D), or (B, M, T, D) with one memory per member."""
        parts = h.unbind(1) if stacked else [h]
        found = []
        for memory, hm in zip(memories, parts):
            memory.add_working_memory(hm.detach())
            found.append(memory.remind())  # (B, R_m, D) memories, (B, R_m) indices (-1: padding)
        R = max(idx.shape[1] for _, idx in found)
        mem = torch.stack([F.pad(m, (0, 0, 0, R - m.shape[1])) for m, _ in found], 1)  # (B, M, R, D)
        idx = torch.stack([F.pad(i, (0, R - i.shape[1]), value=-1) for _, i in found], 1)  # (B, M, R)
        if not stacked:
            mem, idx = mem[:, 0], idx[:, 0]
        y, att = run(self.read, h, mem, idx >= 0)  # att (B, [M,] T, R)
        att = att.detach() if stacked else att.detach()[:, None]
        for k, (memory, (_, i)) in enumerate(zip(memories, found)):
            memory.adjust_lifespan_and_memories(i, att[:, k, :, :i.shape[1]].mean(1))  # attention each memory got
        return y
