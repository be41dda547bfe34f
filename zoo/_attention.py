"""Softmax attention for many tiny sequences in one Triton kernel: the (image, member, head) sequences of a
population of tiny transformers (vit_t: 17 tokens of 16 dims, 64 x 4,096 x 2 = 524k sequences a step).

`attention(qkv, heads, causal)` reads q, k, v straight out of the qkv projection `(B, M, T, 3 D)` (any strides with
the last one 1) and writes y `(B, M, T, D)` in qkv's dimension order, so neither side needs the permuted copies
that batched matmuls over `(B M, heads, T, d)` do. One program holds whole sequences: T padded to TP (>= 16, a
power of two) and d to DP, the scores (TP, TP) in registers, so the softmax never leaves the chip. The forward
keeps each row's log-sum-exp (fp32, (n_seq, TP)); the backward recomputes the probabilities from it and writes
dq, dk, dv into one `(B, M, T, 3 D)` gradient laid out as qkv is:
  p = exp(s - lse), dv = p^T do, dp = do v^T, ds = p (dp - rowsum(p dp)), dq = ds k / sqrt(d), dk = ds^T q / sqrt(d).
rowsum(p dp) is summed in fp32 from the registers, as torch's softmax backward does, not as rowsum(do o) from the
bf16-rounded output (flash attention's form): each row of ds then sums to zero up to fp32 rounding, so the key
bias, whose true gradient is zero (softmax is shift-invariant per query), gets no bf16-sized gradient noise for
Adam to turn into lr-sized steps (that form moved a member's test accuracy 0.013 in the plain-loop check).
Count for vit_t (bf16): forward reads qkv and writes y, ~1.1 GB a step; backward reads qkv and dy and writes dqkv,
~2.0 GB: ~0.65 ms at HBM rate, against ~21 ms that the chunked cuBLAS batches and softmax passes took on one H200
(benchmarks/NOTES.md). Without Triton the engine uses its other attention forms; TRITON_INTERPRET=1 runs these
kernels on CPU (tests).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._triton import dot_dtype, launch, on_device, pow2, tl, triton

MAX_T = 128  # longest sequence one program holds (its (TP, TP) scores in registers)
SEQ_PER_PROGRAM = 4  # sequences a program runs one after another (fewer, longer programs)


def supports(T: int, d: int) -> bool:
    return T <= MAX_T and d <= 128


def _warps(TP: int) -> int:
    return 1 if TP <= 16 else 2 if TP <= 32 else 4 if TP <= 64 else 8


if triton is not None:
    @triton.jit
    def _seq_base(s, heads, M, sB, sM, d: tl.constexpr):
        """Offset of sequence s = ((b M + m) heads + h) in a (B, M, T, n D) tensor with strides (sB, sM, ., 1)."""
        h, bm = s % heads, s // heads
        return (bm // M).to(tl.int64) * sB + (bm % M).to(tl.int64) * sM + h * d

    @triton.jit
    def _tile(ptr, s, heads, M, sB, sM, sT, t, c, d: tl.constexpr):
        """(TP, DP) pointers to sequence s's entries in a (B, M, T, n D) tensor of strides (sB, sM, sT, 1)."""
        return ptr + _seq_base(s, heads, M, sB, sM, d) + t[:, None] * sT + c[None, :]

    @triton.jit
    def _load_part(base, b_ptr, ok, c, cm, BIAS: tl.constexpr):
        """One of q, k, v (TP, DP): the projection's entries, plus the member's bias where the projection comes
        without it, rounded to the projection's dtype as torch rounds `product + bias.to(dtype)`."""
        x = tl.load(base, mask=ok, other=0.0)
        if BIAS:
            b = tl.load(b_ptr + c, mask=cm, other=0.0).to(x.dtype).to(tl.float32)
            x = tl.where(ok, (x.to(tl.float32) + b[None, :]).to(x.dtype), 0.0)
        return x

    @triton.jit
    def _load_qkv(qkv_ptr, b_ptr, pb, s, heads, M, sB, sM, sT, t, c, ok, D: tl.constexpr, d: tl.constexpr,
                  BIAS: tl.constexpr):
        """Sequence s's q, k, v, each (TP, DP), zero in the padding; b_ptr the (M, 3 D) bias (row stride pb) when
        BIAS, added here."""
        base = _tile(qkv_ptr, s, heads, M, sB, sM, sT, t, c, d)
        bb = b_ptr + ((s // heads) % M).to(tl.int64) * pb + (s % heads) * d  # this member's, this head's bias
        cm = c < d
        return (_load_part(base, bb, ok, c, cm, BIAS), _load_part(base + D, bb + D, ok, c, cm, BIAS),
                _load_part(base + 2 * D, bb + 2 * D, ok, c, cm, BIAS))

    @triton.jit
    def _scores(q, k, t, T, scale, CAUSAL: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
        """(TP, TP) fp32 scaled scores q k^T, -inf where the key is padding (or in the future, causal); t indexes
        both the query rows and the key columns."""
        s = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=PREC) * scale
        ok = (t < T)[None, :]
        if CAUSAL:
            ok = ok & (t[None, :] <= t[:, None])
        return tl.where(ok, s, float("-inf"))

    @triton.jit
    def _fwd_kernel(qkv_ptr, b_ptr, y_ptr, lse_ptr, n_seq, heads, M, T, sB, sM, sT, pb, yB, yM, yT, scale,
                    D: tl.constexpr, d: tl.constexpr, TP: tl.constexpr, DP: tl.constexpr, SEQ: tl.constexpr,
                    CAUSAL: tl.constexpr, BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
        t, c = tl.arange(0, TP), tl.arange(0, DP)
        ok = (t < T)[:, None] & (c < d)[None, :]
        for i in tl.static_range(SEQ):
            s = tl.program_id(0) * SEQ + i
            if s < n_seq:
                q, k, v = _load_qkv(qkv_ptr, b_ptr, pb, s, heads, M, sB, sM, sT, t, c, ok, D, d, BIAS)  # (TP, DP)
                sc = _scores(q, k, t, T, scale, CAUSAL, DOT_DTYPE, PREC)
                mx = tl.max(sc, 1)
                p = tl.exp(sc - mx[:, None])
                den = tl.sum(p, 1)
                p = p / den[:, None]
                o = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PREC)  # (TP, DP)
                tl.store(_tile(y_ptr, s, heads, M, yB, yM, yT, t, c, d), o.to(y_ptr.dtype.element_ty), mask=ok)
                tl.store(lse_ptr + s.to(tl.int64) * TP + t, mx + tl.log(den))

    @triton.jit
    def _bwd_kernel(qkv_ptr, b_ptr, gy_ptr, lse_ptr, gqkv_ptr, n_seq, heads, M, T, sB, sM, sT, pb, gB, gM, gT,
                    oB, oM, oT, scale, D: tl.constexpr, d: tl.constexpr, TP: tl.constexpr, DP: tl.constexpr,
                    SEQ: tl.constexpr, CAUSAL: tl.constexpr, BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    PREC: tl.constexpr):
        t, c = tl.arange(0, TP), tl.arange(0, DP)
        ok = (t < T)[:, None] & (c < d)[None, :]
        for i in tl.static_range(SEQ):
            s = tl.program_id(0) * SEQ + i
            if s < n_seq:
                q, k, v = _load_qkv(qkv_ptr, b_ptr, pb, s, heads, M, sB, sM, sT, t, c, ok, D, d, BIAS)  # (TP, DP)
                go = tl.load(_tile(gy_ptr, s, heads, M, gB, gM, gT, t, c, d), mask=ok, other=0.0)
                lse = tl.load(lse_ptr + s.to(tl.int64) * TP + t)
                # padded query rows have q = 0, a finite lse and go = 0: they add nothing below
                p = tl.exp(_scores(q, k, t, T, scale, CAUSAL, DOT_DTYPE, PREC) - lse[:, None])  # (TP, TP)
                gv = tl.dot(tl.trans(p).to(DOT_DTYPE), go.to(DOT_DTYPE), input_precision=PREC)  # (TP, DP)
                gp = tl.dot(go.to(DOT_DTYPE), tl.trans(v.to(DOT_DTYPE)), input_precision=PREC)  # (TP, TP)
                delta = tl.sum(p * gp, 1)  # (TP,) fp32: each row of gs below sums to ~0
                gs = (p * (gp - delta[:, None]) * scale).to(DOT_DTYPE)
                gq = tl.dot(gs, k.to(DOT_DTYPE), input_precision=PREC)
                gk = tl.dot(tl.trans(gs), q.to(DOT_DTYPE), input_precision=PREC)
                out = _tile(gqkv_ptr, s, heads, M, oB, oM, oT, t, c, d)
                ty = gqkv_ptr.dtype.element_ty
                tl.store(out, gq.to(ty), mask=ok)
                tl.store(out + D, gk.to(ty), mask=ok)
                tl.store(out + 2 * D, gv.to(ty), mask=ok)


def _like(ref: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised dense tensor of `shape` whose dimensions are laid out in `ref`'s order (the qkv
    projection's: batched matmuls over members write (M, B, T, .) physically, and the out projection reads y
    without a copy when y is laid out the same way)."""
    order = sorted(range(ref.dim()), key=lambda i: (-ref.stride(i), -i))  # outermost first
    strides, step = [0] * len(shape), 1
    for i in reversed(order):
        strides[i], step = step, step * shape[i]
    return torch.empty_strided(shape, strides, dtype=ref.dtype, device=ref.device)


def _check(qkv: torch.Tensor, heads: int, bias: Optional[torch.Tensor]) -> tuple[int, int, int, int, int]:
    B, M, T, D3 = qkv.shape
    if D3 % (3 * heads) or qkv.stride(-1) != 1:
        raise ValueError(f"attention: qkv must be (B, M, T, 3 D) with 3 D divisible by 3 x {heads} heads and "
                         f"unit last stride, got shape {tuple(qkv.shape)} strides {qkv.stride()}")
    if bias is not None and (bias.shape != (M, D3) or bias.stride(-1) != 1):
        raise ValueError(f"attention: bias must be (M, 3 D) = ({M}, {D3}) with unit last stride, got shape "
                         f"{tuple(bias.shape)} strides {bias.stride()}")
    return B, M, T, D3 // 3, D3 // 3 // heads


def _padded(n: int) -> int:
    """A sequence or head length as the kernels' tiles hold it: a power of two, at least tl.dot's 16."""
    return max(16, pow2(n))


def _meta(T: int, d: int, dtype: torch.dtype) -> dict:
    TP, DP = _padded(T), _padded(d)
    DOT_DTYPE, PREC = dot_dtype(dtype)
    return dict(TP=TP, DP=DP, SEQ=SEQ_PER_PROGRAM, DOT_DTYPE=DOT_DTYPE, PREC=PREC, num_warps=_warps(TP))


def _bias_args(bias: Optional[torch.Tensor], qkv: torch.Tensor) -> tuple:
    """(pointer, row stride, BIAS) of the kernels' bias arguments; qkv stands in for the pointer without one."""
    return (qkv, 0, False) if bias is None else (bias, bias.stride(0), True)


@torch.library.custom_op("weightzoo::attention", mutates_args=())
def _attention_op(qkv: torch.Tensor, bias: Optional[torch.Tensor], heads: int, causal: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (B, M, T, D) laid out as qkv, lse (B M heads, TP) fp32)."""
    B, M, T, D, d = _check(qkv, heads, bias)
    meta = _meta(T, d, qkv.dtype)
    y = _like(qkv, (B, M, T, D))
    n_seq = B * M * heads
    lse = torch.empty(n_seq, meta["TP"], device=qkv.device, dtype=torch.float32)
    b, pb, has_bias = _bias_args(bias, qkv)
    with on_device(qkv.device):
        launch(_fwd_kernel, (triton.cdiv(n_seq, SEQ_PER_PROGRAM),), qkv, b, y, lse, n_seq, heads, M, T,
               *qkv.stride()[:3], pb, *y.stride()[:3], d ** -0.5, D=D, d=d, CAUSAL=causal, BIAS=has_bias, **meta)
    return y, lse


@_attention_op.register_fake
def _(qkv, bias, heads, causal):
    B, M, T, D, d = _check(qkv, heads, bias)
    return _like(qkv, (B, M, T, D)), qkv.new_empty(B * M * heads, _padded(T), dtype=torch.float32)


@torch.library.custom_op("weightzoo::attention_backward", mutates_args=())
def _backward_op(gy: torch.Tensor, qkv: torch.Tensor, bias: Optional[torch.Tensor], lse: torch.Tensor, heads: int,
                 causal: bool) -> torch.Tensor:
    """d loss / d qkv, (B, M, T, 3 D) laid out as qkv (with or without the bias, the same gradient)."""
    B, M, T, D, d = _check(qkv, heads, bias)
    gy = gy.to(qkv.dtype)
    gy = gy if gy.stride(-1) == 1 else gy.contiguous()
    g = _like(qkv, qkv.shape)
    n_seq = B * M * heads
    b, pb, has_bias = _bias_args(bias, qkv)
    with on_device(qkv.device):
        launch(_bwd_kernel, (triton.cdiv(n_seq, SEQ_PER_PROGRAM),), qkv, b, gy, lse, g, n_seq, heads, M, T,
               *qkv.stride()[:3], pb, *gy.stride()[:3], *g.stride()[:3], d ** -0.5, D=D, d=d, CAUSAL=causal,
               BIAS=has_bias, **_meta(T, d, qkv.dtype))
    return g


@_backward_op.register_fake
def _(gy, qkv, bias, lse, heads, causal):
    return _like(qkv, qkv.shape)


def _setup(ctx, inputs, output):
    qkv, bias, heads, causal = inputs
    ctx.save_for_backward(qkv, bias, output[1])  # the inputs and lse: the backward recomputes the rest
    ctx.heads, ctx.causal = heads, causal


def _backward(ctx, gy, glse):
    qkv, bias, lse = ctx.saved_tensors
    g = _backward_op(gy, qkv, bias, lse, ctx.heads, ctx.causal)
    # the bias gradient as autograd gives it for `product + bias.to(dtype)`: summed in g's dtype, then cast
    gb = None if bias is None else g.sum((0, 2)).to(bias.dtype)
    return g, gb, None, None


_attention_op.register_autograd(_backward, setup_context=_setup)


def attention(qkv: torch.Tensor, heads: int, causal: bool = False, bias: Optional[torch.Tensor] = None
              ) -> torch.Tensor:
    """qkv (B, M, T, 3 D) = [q | k | v] per token, each D = heads x d -> y (B, M, T, D): softmax(q k^T / sqrt(d)) v
    per (image, member, head) sequence, in qkv's dtype (bf16: tensor cores, fp32 softmax; fp32: exact fp32).
    With `bias` (M, 3 D), qkv is the projection without its bias, which the kernels add as they read q, k, v:
    no pass writes the biased projection, and the backward reads the same tensor the forward did.
    The caller checks `_triton.available(qkv.device)` and `supports(T, d)`."""
    return _attention_op(qkv, bias, heads, causal)[0]
