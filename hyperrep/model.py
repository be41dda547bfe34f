"""SANE-style transformer autoencoder over weight tokens, and its loss.

tokens (B, T, S) -> linear embedding + 3 learned position embeddings -> encoder (non-causal,
scaled_dot_product_attention) -> per-token latents (B, T, d_latent) -> decoder -> tokens (B, T, S).
A model's embedding is the mean of its token latents. A projection head maps that mean to the space
of the contrastive loss: L = (1 - gamma) * masked MSE + gamma * NT-Xent(tau) between two views.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class AEShape:
    """Autoencoder size; no defaults here: `FitConfig` holds them, this spec just carries them."""
    token_size: int
    max_positions: tuple[int, int, int]  # sizes of the (global, layer, within-layer) position tables
    d_model: int
    n_layers: int
    n_heads: int
    d_latent: int
    d_proj: int
    dropout: float


class Block(nn.Module):
    """Pre-norm transformer block, bidirectional attention."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(dropout))

    def forward(self, x):  # (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class Positions(nn.Module):
    def __init__(self, sizes: tuple[int, int, int], d: int):
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n, d) for n in sizes)
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.02)

    def forward(self, pos):  # (B, T, 3) int -> (B, T, D)
        return sum(t(pos[..., i]) for i, t in enumerate(self.tables))


class HyperAE(nn.Module):
    def __init__(self, shape: AEShape):
        super().__init__()
        s, d = shape, shape.d_model
        if d % s.n_heads:
            raise ValueError(f"d_model={d} is not divisible by n_heads={s.n_heads}")
        self.shape = shape
        self.embed = nn.Linear(s.token_size, d)
        self.enc_pos, self.dec_pos = Positions(s.max_positions, d), Positions(s.max_positions, d)
        self.encoder = nn.ModuleList(Block(d, s.n_heads, s.dropout) for _ in range(s.n_layers))
        self.to_latent = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, s.d_latent))
        self.from_latent = nn.Linear(s.d_latent, d)
        self.decoder = nn.ModuleList(Block(d, s.n_heads, s.dropout) for _ in range(s.n_layers))
        self.to_tokens = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, s.token_size))
        self.head = nn.Sequential(nn.Linear(s.d_latent, s.d_proj), nn.GELU(), nn.Linear(s.d_proj, s.d_proj))

    def encode(self, tokens, pos):
        """(B, T, S), (B, T, 3) -> per-token latents (B, T, d_latent)."""
        x = self.embed(tokens) + self.enc_pos(pos)
        for blk in self.encoder:
            x = blk(x)
        return self.to_latent(x)

    def decode(self, z, pos):
        x = self.from_latent(z) + self.dec_pos(pos)
        for blk in self.decoder:
            x = blk(x)
        return self.to_tokens(x)

    def forward(self, tokens, pos):
        """-> (reconstructed tokens (B, T, S), latents (B, T, d_latent), projection (B, d_proj))."""
        z = self.encode(tokens, pos)
        return self.decode(z, pos), z, self.head(z.mean(1))

    def embed_model(self, tokens, pos):
        """A model's embedding: the mean of its token latents, (B, d_latent)."""
        return self.encode(tokens, pos).mean(1)


def layer_weights(mask: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
    """mask (B, T, S) bool, layer (T,) layer id of each token -> (B, T, S) float weights under which every layer's
    real entries sum to 1: a masked MSE with them is the mean over layers of each layer's MSE (small layers, e.g.
    biases and the classifier, count as much as a large conv), as SANE's per-layer loss normalisation."""
    per_layer = torch.zeros(int(layer.max()) + 1, device=mask.device).index_add_(0, layer, mask[0].sum(-1).float())
    return mask.float() / per_layer[layer].clamp(min=1)[None, :, None]


def masked_mse(pred, target, mask):
    """Mean squared error over real (unpadded) token entries; a float mask weights them."""
    m = mask.to(pred.dtype)
    return ((pred - target) ** 2 * m).sum() / m.sum().clamp(min=1)


def nt_xent(a, b, tau: float):
    """Normalized-temperature cross entropy (SimCLR) between two views, (B, D) each."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / tau
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def sane_loss(recon, target, mask, proj_a, proj_b, gamma: float, tau: float):
    """(total, mse, contrastive); recon/target/mask cover both views stacked on the batch dim."""
    mse = masked_mse(recon, target, mask)
    con = nt_xent(proj_a, proj_b, tau) if gamma > 0 else torch.zeros((), device=recon.device)
    return (1 - gamma) * mse + gamma * con, mse, con
