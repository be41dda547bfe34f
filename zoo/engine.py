"""The population engine's forward pass: one registry architecture run for M members at once.

Activations are laid out `(B, M, *features)` (or `(B, 1, ...)` when every member sees the same images, as
in evaluation); parameters are per-member tensors `(M, *shape)`, views of one flat `(M, P)` buffer.
Convolutions run as fused per-member Triton kernels on CUDA (`_convpool.py`), one grouped convolution
(groups = M) or im2col + batched matmul; linear layers as one batched matmul. Each layer type of the
registry has a rule here (`RULES`); a new layer type registers one with `@rule(LayerType)`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _attnblock, _directconv, _mlp
from ._attention import attention as triton_attention
from ._attention import supports as triton_attention_fits
from ._convpool import available as triton_available
from ._convpool import conv_pool, runs_direct
from ._directconv import activation_codes, is_channels_last
from ._rng import hash32
from ._triton import checked_form
from .cli import UsageError
from .models import (
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
from .models.tether import TETHERED, TetheredConv2d, TetheredLinear
from .spec import Layout, ModelSpec

CONV_PATHS = ("auto", "grouped", "unfold", "fused")
# Attention's two products per (image, member, head) sequence, four forms (`set_attention_form`): "bmm", batched
# matmuls (cuBLAS splits batches past 65,535 into chunks and runs tiny 17 x 17 x 16 tiles in old-arch kernels:
# 18 of vit_t's 50 ms a step on one H200, benchmarks/NOTES.md); "reduce", broadcast products summed over the
# shared axis, which inductor compiles into single reduction kernels that never hold the (T, T, d) product
# (without compile it materialises that product: it is for compiled populations; measured 2.3x slower than bmm);
# "sdpa", torch's fused scaled_dot_product_attention (flash / memory-efficient kernels on CUDA) over the
# sequences laid out (B, M * heads, T, d): images on the kernels' batch axis, members x heads on their head
# axis, so neither passes the 65,535 grid limit that a (B * M, heads) batch does; "triton" (default), our kernel
# (`_attention.py`): whole sequences per program, q, k, v read from the qkv projection in place, the scores never
# leave the chip. It runs where the population runs its Triton kernels (conv "fused", CUDA by default) and a
# sequence fits one program; elsewhere "bmm" does. On one H100 vit_t's step went 53.0 -> 34.1 ms with it
# (bmm -> triton; sdpa's kernels were slower than bmm there; benchmarks/NOTES.md). "block": a whole pre-norm block,
# Residual(LayerNorm, SelfAttention, Dropout), in one Triton kernel each way (`_attnblock.py`) where
# the block fits one program (the engine's hashed dropout masks in the kernels); elsewhere as "triton".
ATTENTION_FORMS = ("bmm", "reduce", "sdpa", "triton", "block")
attention_form = "triton"
# vit_t's patch embedding (stride = kernel): "conv", the conv rule (direct Triton kernels on CUDA), or "matmul",
# patches cut by a reshape and one per-member matmul (`set_patch_form`)
PATCH_FORMS = ("conv", "matmul")
patch_form = "matmul"
# the token stream a patch embedding starts, (B, M, T, D): "images", contiguous (image outermost); "members", member
# outermost in memory (a (M, B, T, D) buffer seen transposed), the layout of the per-member matmuls' operands and
# results, so their inputs need no permuted copy, but vit_t measured slower with it on one H100 (154.6 against 163.5
# model-epochs/s; benchmarks/NOTES.md): inductor fuses those copies into the layer norms (`set_token_layout`)
TOKEN_LAYOUTS = ("images", "members")
token_layout = "images"
# a pre-norm MLP block, Residual(LayerNorm, Linear, Activation, Dropout, Linear, Dropout): "layers", each layer's
# rule; "fused" (default), one Triton kernel each way (`_mlp.py`, the engine's hashed dropout masks included) where
# the population runs its Triton kernels, every member's activation has a code there, and the widths fit one
# program (`set_mlp_form`)
MLP_FORMS = ("layers", "fused")
mlp_form = "fused"
RULES: dict[type, Callable] = {}


def rule(layer_type: type):
    """Decorator: `fn(module, prefix, x (B, M, ...), ctx) -> y` runs `layer_type` for every member."""
    def deco(fn):
        RULES[layer_type] = fn
        return fn
    return deco


def missing_rules(module: nn.Module) -> list[str]:
    """Names of the layer types in `module` that the engine has no rule for (empty: it can run it)."""
    inner = (MemoryRead,)  # run by their parent's rule
    return sorted({type(m).__name__ for m in module.modules() if type(m) not in RULES and not isinstance(m, inner)})


def runs(values: Sequence[str]) -> list[tuple[str, int, int]]:
    """[(value, start, stop)]: maximal runs of equal consecutive values (members sorted by value give one each)."""
    out, start = [], 0
    for value, group in itertools.groupby(values):
        n = len(list(group))
        out.append((value, start, start + n))
        start += n
    return out


def set_attention_form(name: str) -> None:
    """Choose how attention's products run from now on (module comment on `ATTENTION_FORMS`)."""
    global attention_form
    attention_form = checked_form("attention form", name, ATTENTION_FORMS)


def set_token_layout(name: str) -> None:
    """Choose the token stream's memory layout from now on (module comment on `TOKEN_LAYOUTS`)."""
    global token_layout
    token_layout = checked_form("token layout", name, TOKEN_LAYOUTS)


def set_mlp_form(name: str) -> None:
    """Choose how a transformer block's MLP runs from now on (module comment on `MLP_FORMS`)."""
    global mlp_form
    mlp_form = checked_form("mlp form", name, MLP_FORMS)


def set_patch_form(name: str) -> None:
    """Choose how a non-overlapping patch embedding runs from now on (module comment on `PATCH_FORMS`)."""
    global patch_form
    patch_form = checked_form("patch form", name, PATCH_FORMS)


@dataclass
class _Ctx:
    params: dict[str, torch.Tensor]  # name -> (M, *shape)
    act_runs: list[tuple[str, int, int]]  # per-member activation: (name, first member, end) runs along M
    dropout: torch.Tensor | None  # (M,) rates while training, None when off
    step_key: torch.Tensor | None  # (M,) int64, a member's key for this step's dropout masks
    conv: str = "grouped"  # "grouped" conv, "unfold" (im2col + batched matmul) or "fused" (Triton, _convpool.py)
    bf16: bool = False  # bf16 autocast is on (the fused kernels then run in bf16 as torch's conv would)
    n_dropout: int = 0  # dropout layers seen so far in this forward pass
    act_codes: torch.Tensor | None = None  # (M,) int32 when the direct convs may run the activation after them
    mlp_codes: torch.Tensor | None = None  # (M,) int32 when the fused MLP block can run every member's activation


def _member_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """(M,) per-member values, broadcast against a (B, M, *features) activation of `ndim` dims."""
    return v.view(1, -1, *[1] * (ndim - 2))


def _out_size(size: int, k: int, pad: int, dil: int, stride: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _fusable(m: nn.Conv2d, pool: nn.Module | None = None) -> bool:
    """Square kernel, equal strides/paddings, no dilation or groups (and a plain k x k, stride k max-pool)."""
    sq = lambda v: v[0] == v[1]
    ok = sq(m.kernel_size) and sq(m.stride) and sq(m.padding) and m.dilation == (1, 1) and m.groups == 1
    if pool is not None:
        k, s = pool.kernel_size, pool.stride
        ok = ok and isinstance(k, int) and s in (k, (k, k)) and pool.padding == 0 and pool.dilation == 1 \
            and not pool.ceil_mode
    return ok and m.padding_mode == "zeros"


def _conv_pool(m: nn.Conv2d, p: str, x: torch.Tensor, ctx: _Ctx, pool: int = 1, act: torch.Tensor | None = None,
               dropout: _directconv.Dropout | None = None) -> torch.Tensor:
    """Triton conv (+ max-pool, or + the members' activations `act`, and their dropout) on (B, M, C, H, W); in
    bf16 under autocast, as torch's conv would be."""
    w, b = ctx.params[p + "weight"], ctx.params[p + "bias"]
    if ctx.bf16:
        x = x.to(torch.bfloat16)
    # it makes x contiguous where it must
    return conv_pool(x, w, b, m.stride[0], m.padding[0], pool, act, dropout)


def _fuses_activation(m: nn.Module, nxt: nn.Module | None, x: torch.Tensor, ctx: _Ctx) -> bool:
    """A conv on the direct kernels followed by the activation, every member's with a fused form."""
    return (ctx.conv == "fused" and ctx.act_codes is not None and isinstance(m, nn.Conv2d)
            and isinstance(nxt, Activation) and _fusable(m) and runs_direct(x.device, m.stride[0]))


@rule(nn.Conv2d)
def _conv(m: nn.Conv2d, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    w, b = ctx.params[p + "weight"], ctx.params[p + "bias"]  # (M, O, C, k, k), (M, O)
    M, O = w.shape[:2]
    B, Mx, C, H, W = x.shape
    kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation)
    if ctx.conv == "fused" and _fusable(m):  # the band kernel (it reads a shared input once, too)
        return _conv_pool(m, p, x, ctx)
    if Mx == 1 and M > 1:  # every member sees the same images (evaluation): one dense conv
        y = F.conv2d(x[:, 0], w.reshape(M * O, C, *w.shape[3:]), b.reshape(-1), **kw)
    elif ctx.conv == "unfold":  # (1, M, O, C*k*k) @ (B, M, C*k*k, L): batched matmul on tensor cores
        cols = F.unfold(x.reshape(B, M * C, H, W), w.shape[3:], m.dilation, m.padding, m.stride)
        y = (w.reshape(1, M, O, -1) @ cols.view(B, M, -1, cols.shape[-1])) + b.view(1, M, O, 1)
        h2, w2 = (_out_size(s, k, p_, d, st) for s, k, p_, d, st in
                  zip((H, W), w.shape[3:], m.padding, m.dilation, m.stride))
        return y.view(B, M, O, h2, w2)
    else:  # (B, M*C, H, W) * (M*O, C, k, k), groups = M
        y = F.conv2d(x.reshape(B, M * C, H, W), w.reshape(M * O, C, *w.shape[3:]), b.reshape(-1), groups=M, **kw)
    return y.view(B, M, O, *y.shape[-2:])


def _product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (B, M or 1, ..., I) @ w (M, O, I)^T per member -> (B, M, ..., O): one batched matmul."""
    if x.shape[1] == 1 and w.shape[0] > 1:  # shared input (evaluation)
        return torch.einsum("b...i,moi->bm...o", x[:, 0], w)
    return torch.einsum("bm...i,moi->bm...o", x, w)


def _affine(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x (B, M or 1, ..., I) @ w (M, O, I)^T + b (M, O) per member -> (B, M, ..., O): one batched matmul."""
    y = _product(x, w)
    # the bias in the product's dtype, as F.linear under autocast: a float32 bias would promote a bf16 product to
    # float32 and double every byte downstream (vit_t's attention ran on fp32 qkv so, 5x slower on an H100)
    return y + b.view(1, b.shape[0], *[1] * (y.dim() - 3), b.shape[1]).to(y.dtype)


@rule(nn.Linear)
def _linear(m: nn.Linear, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    return _affine(x, ctx.params[p + "weight"], ctx.params[p + "bias"])  # (M, O, I), (M, O)


@rule(nn.MaxPool2d)
def _pool(m: nn.MaxPool2d, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    y = F.max_pool2d(x.flatten(1, 2), m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    return y.view(*x.shape[:3], *y.shape[-2:])


def _next_dropout_key(ctx: _Ctx) -> torch.Tensor:
    """(M,) the members' keys for the next dropout layer of this forward pass (the layer count advances)."""
    ctx.n_dropout += 1
    return hash32(ctx.step_key, ctx.n_dropout, torch.zeros_like(ctx.step_key)) & 0x7FFFFFFF


@rule(nn.Dropout)
def _dropout(m: nn.Dropout, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """Inverted dropout with per-member rates. Masks hash (member key, layer, element): a member's
    masks do not depend on which other members share its population."""
    if ctx.dropout is None:
        return x
    B, M = x.shape[:2]
    key = _next_dropout_key(ctx)  # (M,)
    elem = torch.arange(B * x[0, 0].numel(), device=x.device).view(B, 1, *x.shape[2:])
    # the xor keeps inductor from folding arange * constant into an int32 index expression, which
    # overflows for ~10^7-element activations (torch 2.11: "Scalar ... is out of range for type int32")
    u = hash32(_member_view(key, x.dim()), 0, elem ^ 0x5BD1E995)  # (B, M, ...) uniform in [0, 2^32)
    keep = _member_view(1.0 - ctx.dropout, x.dim())
    return x * (u >= _member_view(ctx.dropout.double() * 2**32, x.dim())) / keep


def _conv_dropout(ctx: _Ctx) -> _directconv.Dropout | None:
    """The next dropout layer's masks for a direct conv's kernels, keyed as `_dropout` keys them (the layer
    count advances); None while dropout is off (the layer is the identity then)."""
    if ctx.dropout is None:
        return None
    return _directconv.Dropout(_next_dropout_key(ctx), *_keep_limits(ctx))


def _keep_limits(ctx: _Ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,) int64 thresholds and (M,) keep probabilities of the kernels' dropout: u >= rate 2^32 for integer
    hashes u is u >= ceil(rate 2^32), the threshold `_dropout` compares against."""
    return torch.ceil(ctx.dropout.double() * 2**32).long(), 1.0 - ctx.dropout


@rule(nn.LayerNorm)
def _layer_norm(m: nn.LayerNorm, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    w, b = ctx.params[p + "weight"], ctx.params[p + "bias"]  # (M, D)
    y = F.layer_norm(x, m.normalized_shape, eps=m.eps)
    shape = (1, w.shape[0], *[1] * (x.dim() - 3), w.shape[1])
    return y * w.view(shape) + b.view(shape)


def _patches(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, M, C, H, W) -> (B, M, (H/k) (W/k), C k k): the non-overlapping k x k patches, in (c, ky, kx) order."""
    B, M, C, H, W = x.shape
    x = x.reshape(B, M, C, H // k, k, W // k, k).permute(0, 1, 3, 5, 2, 4, 6)  # (B, M, H/k, W/k, C, k, k)
    return x.reshape(B, M, (H // k) * (W // k), C * k * k)


@rule(PatchEmbed)
def _patch_embed(m: PatchEmbed, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    k, conv = m.proj.kernel_size[0], m.proj
    tiles = (conv.stride == conv.kernel_size == (k, k) and conv.padding == (0, 0)
             and x.shape[-1] % k == x.shape[-2] % k == 0)  # the patches tile the image
    if patch_form == "matmul" and tiles:
        # stride = kernel: the conv is one per-member matmul over the patches, whose copy inductor fuses into the
        # input's normalisation, and whose weight gradient is a cuBLAS GEMM (K = C k k), where the direct conv
        # kernel gathered each element of a one-channel patch alone (3.3 of vit_t's 34 ms a step on an H100)
        w = ctx.params[p + "proj.weight"]  # (M, D, C, k, k)
        t = _affine(_patches(x, k), w.flatten(2), ctx.params[p + "proj.bias"])  # (B, M, P, D)
    else:
        t = _conv(m.proj, p + "proj.", x, ctx).flatten(3).transpose(2, 3)  # (B, M, P, D)
    cls, pos = ctx.params[p + "cls"], ctx.params[p + "pos"]  # (M, 1, 1, D), (M, 1, P+1, D)
    if token_layout == "members":  # built as (M, B, T, D), handed on transposed
        return (torch.cat([cls.expand(-1, len(t), -1, -1), t.transpose(0, 1)], dim=2) + pos).transpose(0, 1)
    t = torch.cat([cls.transpose(0, 1).expand(len(t), -1, -1, -1), t], dim=2)
    return t + pos.transpose(0, 1)


@rule(SelfAttention)
def _attention(m: SelfAttention, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    B, M, T, D = x.shape
    if attention_form == "sdpa":
        return _attention_sdpa(m, p, x, ctx)
    if attention_form in ("triton", "block") and ctx.conv == "fused" and triton_attention_fits(T, D // m.heads):
        # the kernels add qkv's bias as they read the product: inductor wrote the biased qkv twice (once padded,
        # saved for the backward, which copied it back): 1.6 ms a block, ~3.2 of vit_t's 26.6 ms a step on an H100
        qkv = _product(x, ctx.params[p + "qkv.weight"])  # (B, M, T, 3 D) laid out (M, B, T, 3 D)
        y = triton_attention(qkv, m.heads, m.causal, bias=ctx.params[p + "qkv.bias"])  # (B, M, T, D)
        return _linear(m.out, p + "out.", y, ctx)
    q, k, v = _linear(m.qkv, p + "qkv.", x, ctx).reshape(B * M, T, 3, m.heads, D // m.heads).permute(2, 0, 3, 1, 4)
    # explicit softmax attention: T is tiny, and fused kernels reject batch B*M in the 10^5 range
    reduce = attention_form == "reduce"
    qk = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) if reduce else q @ k.transpose(-1, -2)
    scores = qk * (D // m.heads) ** -0.5  # (B*M, heads, T, T)
    if m.causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
    att = torch.softmax(scores, dim=-1)
    # att is fp32 under autocast (softmax); the matmul would cast it to v's dtype, so "reduce" does too
    y = (att.to(v.dtype).unsqueeze(-1) * v.unsqueeze(-3)).sum(-2) if reduce else att @ v  # (B*M, heads, T, D/h)
    return _linear(m.out, p + "out.", y.transpose(1, 2).reshape(B, M, T, D), ctx)


def _attention_sdpa(m: SelfAttention, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """Attention as one fused kernel call; same scale (d ** -0.5) and causal mask as the explicit forms."""
    B, M, T, D = x.shape
    h, d = m.heads, D // m.heads
    qkv = _linear(m.qkv, p + "qkv.", x, ctx).view(B, M, T, 3, h, d)
    q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, B, M * h, T, d)  # one copy, (3, B, M h, T, d)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=m.causal)  # (B, M h, T, d)
    y = y.view(B, M, h, T, d).transpose(2, 3).reshape(B, M, T, D)
    return _linear(m.out, p + "out.", y, ctx)


@rule(TokenEmbed)
def _token_embed(m: TokenEmbed, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """x (B, M or 1, T) token ids -> (B, M, T, D): each member's own rows of its embedding, plus positions."""
    tok, pos = ctx.params[p + "tok"], ctx.params[p + "pos"]  # (M, V, D), (M, 1, block, D)
    B, M, T = x.shape[0], tok.shape[0], x.shape[-1]
    ids = x.long().expand(B, M, T)
    members = torch.arange(M, device=x.device).view(1, M, 1)
    return tok[members, ids] + pos[:, 0, :T].unsqueeze(0)


@rule(TiedHead)
def _tied_head(m: TiedHead, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    return torch.einsum("bm...d,mvd->bm...v", x, ctx.params[m.key])  # (B, M, T, D) -> (B, M, T, V)


@rule(MemoryMLP)
def _memory_mlp(m: MemoryMLP, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    y = _linear(m.proj, p + "proj.", _activation(m.act, "", _linear(m.fc, p + "fc.", x, ctx), ctx), ctx)
    if m.mem:
        h = _activation(m.act, "", _linear(m.mem_fc, p + "mem_fc.", x, ctx), ctx)
        y = y + _linear(m.mem_proj, p + "mem_proj.", h, ctx)
    return _dropout(m.drop, p + "drop.", y, ctx)


@rule(SegmentedMemoria)
def _segmented_memoria(m: SegmentedMemoria, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """The module's own segment loop on (B, M, L, D): one Memoria memory per member (its batch elements are
    not independent, see SegmentedMemoria); the blocks and the memory read run batched over members."""
    def run(part, t, *extra):
        if part is m.read:  # MemoryRead: per-member q/k/v/o
            return m.read(t, *extra, linear=lambda name, u: _linear(getattr(m.read, name), f"{p}read.{name}.", u, ctx))
        return _sequential(part, p + ("pre." if part is m.pre else "post."), t, ctx)
    return m.forward(x, run, members=ctx.params[p + "read.q.weight"].shape[0])


def _join(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """torch.cat without the copy when there is one part (a population with one activation/optimizer)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


@rule(Activation)
def _activation(m: Activation, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """Each member's own activation on its slice of (B, M, ...). A channels-last conv output (_directconv.py)
    is sliced and joined as its (B, M, H, W, C) view, so the join keeps that layout for the next conv."""
    cl = is_channels_last(x)
    xs = x.permute(0, 1, 3, 4, 2) if cl else x
    y = _join([ACTIVATIONS[name](xs[:, a:b]) for name, a, b in ctx.act_runs], dim=1)
    return y.permute(0, 1, 4, 2, 3) if cl else y


@rule(nn.Sequential)
def _sequential(m: nn.Sequential, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    children = list(m.named_children())
    i = 0
    while i < len(children):
        name, child = children[i]
        nxt = children[i + 1][1] if i + 1 < len(children) else None
        if (ctx.conv == "fused" and isinstance(child, nn.Conv2d) and isinstance(nxt, nn.MaxPool2d)
                and _fusable(child, nxt)):  # conv -> max-pool in one kernel
            x = _conv_pool(child, f"{p}{name}.", x, ctx, nxt.kernel_size)
            i += 2
            continue
        if _fuses_activation(child, nxt, x, ctx):  # conv -> activation in one kernel (its derivative in dw)
            after = children[i + 2][1] if i + 2 < len(children) else None
            drop = _conv_dropout(ctx) if isinstance(after, nn.Dropout) and _directconv.fuse_dropout else None
            x = _conv_pool(child, f"{p}{name}.", x, ctx, act=ctx.act_codes, dropout=drop)
            i += 3 if drop is not None else 2
            continue
        x = run_layer(child, f"{p}{name}.", x, ctx)
        i += 1
    return x


rule(TetheredConv2d)(_conv)  # their weights arrive as W * T (BatchedNet.forward)
rule(TetheredLinear)(_linear)
rule(nn.Flatten)(lambda m, p, x, ctx: x.flatten(2))
rule(GlobalAvgPool)(lambda m, p, x, ctx: x.mean(dim=(-2, -1)))
MLP_BODY = (nn.LayerNorm, nn.Linear, Activation, nn.Dropout, nn.Linear, nn.Dropout)
ATTENTION_BODY = (nn.LayerNorm, SelfAttention, nn.Dropout)


def _fusable_block(m: Residual, kinds: tuple, x: torch.Tensor, ctx: _Ctx) -> bool:
    """A pre-norm block of layer types `kinds` on (B, M, T, D), the population on its Triton kernels, an affine
    layer norm over D."""
    body = list(m.body)
    return (ctx.conv == "fused" and x.dim() == 4 and len(body) == len(kinds)
            and all(type(a) is b for a, b in zip(body, kinds)) and body[0].elementwise_affine
            and body[0].bias is not None and tuple(body[0].normalized_shape) == (x.shape[-1],))


def _fuses_mlp(m: Residual, x: torch.Tensor, ctx: _Ctx) -> bool:
    """A pre-norm MLP block the fused kernels run (`mlp_form` "fused"): every member's activation coded, biased
    linears D -> F -> D of widths one program holds."""
    if not (mlp_form == "fused" and ctx.mlp_codes is not None and _fusable_block(m, MLP_BODY, x, ctx)):
        return False
    fc1, fc2, D = m.body[1], m.body[4], x.shape[-1]
    return (fc1.bias is not None and fc2.bias is not None and fc1.in_features == fc2.out_features == D
            and x.shape[1] == len(ctx.mlp_codes) and _mlp.supports(D, fc1.out_features))


def _fuses_attention(m: Residual, x: torch.Tensor, ctx: _Ctx) -> bool:
    """A pre-norm attention block the fused kernels run (`attention_form` "block")."""
    return (attention_form == "block" and _fusable_block(m, ATTENTION_BODY, x, ctx)
            and _attnblock.supports(x.shape[2], x.shape[3], m.body[1].heads))


def _block_dropout(ctx: _Ctx, n: int) -> _mlp.Dropout | None:
    """The masks of the n dropout layers a fused block stands for, keyed as `_dropout` keys them (the count of
    dropout layers advances as if they ran); None while dropout is off."""
    if ctx.dropout is None:
        return None
    keys = torch.stack([_next_dropout_key(ctx) for _ in range(n)])
    return _mlp.Dropout(keys, *_keep_limits(ctx))


@rule(Residual)
def _residual(m: Residual, p: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    q = lambda name: ctx.params[f"{p}body.{name}"]
    if _fuses_mlp(m, x, ctx):
        return _mlp.residual_mlp(x, q("0.weight"), q("0.bias"), q("1.weight"), q("1.bias"), q("4.weight"),
                                 q("4.bias"), ctx.mlp_codes, m.body[0].eps, ctx.bf16, _block_dropout(ctx, 2))
    if _fuses_attention(m, x, ctx):
        att = m.body[1]
        return _attnblock.attention_block(x, q("0.weight"), q("0.bias"), q("1.qkv.weight"), q("1.qkv.bias"),
                                          q("1.out.weight"), q("1.out.bias"), att.heads, att.causal, m.body[0].eps,
                                          ctx.bf16, _block_dropout(ctx, 1))
    return x + _sequential(m.body, p + "body.", x, ctx)


rule(ClassToken)(lambda m, p, x, ctx: x[..., 0, :])


def run_layer(m: nn.Module, prefix: str, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    op = RULES.get(type(m))
    if op is None:
        raise TypeError(f"population engine has no rule for layer type {type(m).__name__} at '{prefix}'")
    return op(m, prefix, x, ctx)


def resolve_conv(conv: str, device: torch.device) -> str:
    """'auto' -> the Triton kernels where they run natively (CUDA), else PyTorch's grouped conv."""
    if conv not in CONV_PATHS:
        raise UsageError(f"conv must be one of {', '.join(CONV_PATHS)}, got {conv!r}")
    if conv == "auto":
        return "fused" if device.type == "cuda" and triton_available(device) else "grouped"
    return conv


class BatchedNet:
    """The forward pass of M members of one `ModelSpec`, each with its own weights and activation."""

    def __init__(self, spec: ModelSpec, activations: Sequence[str], device: torch.device | str = "cpu",
                 conv: str = "auto", precision: str = "fp32"):
        if precision not in ("fp32", "bf16"):
            raise UsageError(f"precision must be fp32 or bf16, got {precision!r}")
        self.spec, self.device = spec, torch.device(device)
        self.template = spec.create(activations[0] if activations else None)
        missing = missing_rules(self.template)
        if missing:
            raise UsageError(f"architecture '{spec.architecture}' uses layer types the population engine has no rule "
                             f"for: {', '.join(missing)} (add one with zoo.engine.rule)")
        self.layout = Layout.of(self.template)
        self.tethered = [n for n, m in self.template.named_modules() if isinstance(m, TETHERED)]
        self.act_runs = runs(list(activations))
        self.conv = resolve_conv(conv, self.device)
        self.precision = precision

    @property
    def act_runs(self) -> list[tuple[str, int, int]]:
        """Each member's activation as (name, first member, end) runs along M."""
        return self._act_runs

    @act_runs.setter
    def act_runs(self, value: list[tuple[str, int, int]]) -> None:
        self._act_runs = value
        self.size = value[-1][2] if value else 0
        names = [n for n, a, b in value for _ in range(a, b)]
        self.act_codes = activation_codes(names, self.device)
        self.mlp_codes = _mlp.codes(names, self.device)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """(M, P) -> per-tensor views (M, *shape), state_dict order."""
        return self.layout.views(flat)

    def forward(self, x: torch.Tensor, params: torch.Tensor | list[torch.Tensor], dropout: torch.Tensor | None = None,
                step_key: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, M or 1, C, H, W) float, params (M, P) or its views -> (B, M, num_classes) float32 logits.
        `dropout` (M,) rates with `step_key` (M,) turn dropout on (training)."""
        views = self.views(params) if isinstance(params, torch.Tensor) else params
        named = dict(zip(self.layout.names, views))
        for n in self.tethered:  # tethered layers compute with W * T
            named[f"{n}.weight"] = named[f"{n}.weight"] * named[f"{n}.tether"]
        ctx = _Ctx(named, self.act_runs, dropout, step_key, self.conv, self.precision == "bf16",
                   act_codes=self.act_codes if _directconv.fuse_activation else None, mlp_codes=self.mlp_codes)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            return run_layer(self.template, "", x, ctx).float()


def sample_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logits (B, M, K), y (B, M) labels -> (B, M) cross-entropy; for sequences logits (B, M, T, K) and
    targets y (B, M, T), the mean over the positions with a target (y >= 0)."""
    ce = F.cross_entropy(logits.flatten(0, -2), y.clamp(min=0).flatten(), reduction="none").view_as(y)
    if y.dim() == 2:
        return ce
    valid = y >= 0
    return (ce * valid).sum(-1) / valid.sum(-1).clamp(min=1)


def sample_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, M) accuracy per sample: 0/1 for a label, the fraction of positions right for a sequence."""
    hit = logits.argmax(-1) == y
    if y.dim() == 2:
        return hit.float()
    valid = y >= 0
    return (hit & valid).sum(-1) / valid.sum(-1).clamp(min=1)


def activation_numel(template: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """(sum, max) over leaf layers of output elements for one input sample of `shape`."""
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: sizes.append(o.numel()))
             for m in template.modules() if not list(m.children())]
    with torch.no_grad():
        template.eval()(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return sum(sizes), max(sizes)
