"""A pre-norm attention block, y = x + drop(out(attention(qkv(LayerNorm(x))))), for every member of a population
in one Triton kernel each way (vit_t's and gpt_t's `Residual(LayerNorm, SelfAttention, Dropout)`; the dropout masks
are the engine's hashed ones, drawn in the kernels).

Layer by layer the block is the layer norm, the qkv projection (a (B, M, T, 3 D) tensor written and read again),
the attention kernel of `_attention.py`, the output projection and the residual add, each a pass over memory, and
more backward. Here one program holds one member's four (D, D) projections and runs its images R // T at a time,
their tokens side by side in R rows (vit_t: 3 images of 17 tokens in 64 rows): the layer norm, q, k and v for all
heads at once, each head's (R, R) scores from q with the other heads' columns zeroed (so no register tensor is ever
sliced) and masked to the query's own image, the softmax, and the output projection; only x is read and y
written. The backward recomputes the block from x and
accumulates the member's weight gradients in registers over its sequences; sequences are split over programs only
where the members alone do not fill the GPU (partial sums added in a fixed order).

Count for vit_t (T 17, D 32, 2 heads, fp32 residual stream, 4,096 members x 64 images a step): forward reads x and
writes y, 2 x 570 MB; backward reads x and dy and writes dx, 3 x 570 MB: ~2.9 GB a block, ~0.6 ms at an H200's
4.8 TB/s. Measured on one H100 with one image a program step (its 17 tokens padded to 32 rows, commit 6dea7eb),
vit_t's step took 36.2 ms with these kernels against 31.6 with the attention kernel and inductor's layers around
it (benchmarks/NOTES.md). With three images a step (R = 64) the forward measured 1.36 ms a call on one H100 (1.91
with one image a step), the backward 10.0 ms (0.17 TB/s of its bytes): compiled for sm_90a
(`benchmarks/kernel_registers.py`) it holds 255 registers a thread and spills ~1.8 KB (q, k, v, per-head (R, R)
tiles and four (D, D) gradient accumulators on 32-row products). The engine's attention form "block" stays opt-in
until it measures faster.

Numerics follow torch under bf16 autocast as `_attention.py` and `_mlp.py` do: layer norm in fp32, products from
bf16 operands accumulated in fp32 and rounded to bf16 where torch holds a bf16 tensor (q, k, v, the attention
output, the projections' outputs and input gradients), softmax and its backward in fp32 (rowsum(p dp)).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._mlp import Dropout, _check_members, _drop_args, _splits
from ._triton import dot_dtype, launch, on_device, pow2, tl, triton

MAX_T = 64  # longest sequence one program holds: scores (R, R) and eight (R, D) tiles in registers
ROWS = 64  # rows (image, token) a step holds: R // T whole images side by side (vit_t: 3 images of 17 tokens)
WARPS = (4, 4)  # warps a program, (forward, backward); 8 measured 2x slower each way (one H100)


def supports(T: int, D: int, heads: int) -> bool:
    """Sequences and widths one program's tiles hold: T <= MAX_T, D a power of two in 16..64."""
    return T <= MAX_T and 16 <= D <= 64 and D == pow2(D) and D % heads == 0


if triton is not None:
    from ._mlp import _kept, _norm, _norm_backward, _round

    @triton.jit
    def _weight_t(w_ptr, b_ptr, row0, dd, D: tl.constexpr, DT: tl.constexpr):
        """Rows row0 .. row0 + D of a member's (n D, D) weight, transposed to (D in, D out), and their bias."""
        return tl.load(w_ptr + (row0 + dd)[None, :] * D + dd[:, None]).to(DT), _round(tl.load(b_ptr + row0 + dd), DT)

    @triton.jit
    def _proj(a16, wt, b, DT: tl.constexpr, PREC: tl.constexpr):
        """a (R, D) @ wt + b: (R, D) fp32 holding bf16-rounded values under bf16."""
        return _round(_round(tl.dot(a16, wt, input_precision=PREC), DT) + b[None, :], DT)

    @triton.jit
    def _scores(q, k, r, T, scale, CAUSAL: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
        """(R, R) fp32 scaled scores q k^T, -inf where query row and key column (r = image T + token) are of
        different images (or the key is in the query's future). Padding rows past the last image form a group of
        their own, so no row is masked whole."""
        s = tl.dot(q.to(DT), tl.trans(k.to(DT)), input_precision=PREC) * scale
        ok = (r // T)[:, None] == (r // T)[None, :]
        if CAUSAL:
            ok = ok & (r[None, :] <= r[:, None])
        return tl.where(ok, s, float("-inf"))

    @triton.jit
    def _heads_forward(q, k, v, r, dd, T, scale, H: tl.constexpr, d: tl.constexpr, CAUSAL: tl.constexpr,
                       DT: tl.constexpr, PREC: tl.constexpr):
        """softmax(q_h k_h^T scale) v_h for every head h, side by side in one (R, D) tile (fp32)."""
        o = tl.zeros(q.shape, tl.float32)
        for h in tl.static_range(H):
            mh = (dd // d == h)[None, :]
            s = _scores(tl.where(mh, q, 0.0), k, r, T, scale, CAUSAL, DT, PREC)  # (R, R)
            p = tl.exp(s - tl.max(s, 1)[:, None])
            p = p / tl.sum(p, 1)[:, None]
            o += tl.dot(p.to(DT), tl.where(mh, v, 0.0).to(DT), input_precision=PREC)
        return o

    @triton.jit
    def _images(s0, n_img, T, m, sB, sM, sT, r, IMG: tl.constexpr):
        """(R,) element offsets of the tokens of member m's images s0 .. s0 + IMG, row r = (image - s0) T + token,
        the (R,) mask of real rows, and the rows' (image, token) index image T + token (the dropout masks')."""
        i = r // T
        img = (s0 + i).to(tl.int64)
        return img * sB + m.to(tl.int64) * sM + (r % T) * sT, (i < IMG) & (img < n_img), img * T + r % T

    @triton.jit
    def _fwd_kernel(x_ptr, lnw_ptr, lnb_ptr, wqkv_ptr, bqkv_ptr, wo_ptr, bo_ptr, key_ptr, thr_ptr, keep_ptr, y_ptr,
                    n_img, per_split, T, sB, sM, sT, yB, yM, yT, p_lnw, p_lnb, p_wqkv, p_bqkv, p_wo, p_bo, eps, scale,
                    D: tl.constexpr, H: tl.constexpr, R: tl.constexpr, IMG: tl.constexpr, CAUSAL: tl.constexpr,
                    DROP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
        m, split = tl.program_id(0), tl.program_id(1)
        r, dd = tl.arange(0, R), tl.arange(0, D)
        lnw, lnb = tl.load(lnw_ptr + m * p_lnw + dd), tl.load(lnb_ptr + m * p_lnb + dd)
        wqkv, bqkv = wqkv_ptr + m * p_wqkv, bqkv_ptr + m * p_bqkv
        wqt, bq = _weight_t(wqkv, bqkv, 0, dd, D, DT)
        wkt, bk = _weight_t(wqkv, bqkv, D, dd, D, DT)
        wvt, bv = _weight_t(wqkv, bqkv, 2 * D, dd, D, DT)
        wot, bo = _weight_t(wo_ptr + m * p_wo, bo_ptr + m * p_bo, 0, dd, D, DT)
        if DROP:  # the dropout layer's key, the member's threshold and keep probability
            key, thr, keep = tl.load(key_ptr + m), tl.load(thr_ptr + m), tl.load(keep_ptr + m)
        for s0 in range(split * per_split, tl.minimum(n_img, (split + 1) * per_split), IMG):
            xo, ok, row = _images(s0, n_img, T, m, sB, sM, sT, r, IMG)
            yo, _, _ = _images(s0, n_img, T, m, yB, yM, yT, r, IMG)
            x = tl.load(x_ptr + xo[:, None] + dd[None, :], mask=ok[:, None], other=0.0).to(tl.float32)  # (R, D)
            ln = _norm(x, lnw, lnb, eps, D)[2].to(DT)
            q, k, v = _proj(ln, wqt, bq, DT, PREC), _proj(ln, wkt, bk, DT, PREC), _proj(ln, wvt, bv, DT, PREC)
            o = _round(_heads_forward(q, k, v, r, dd, T, scale, H, D // H, CAUSAL, DT, PREC), DT)
            out = _proj(o.to(DT), wot, bo, DT, PREC)
            if DROP:  # x * mask / keep in fp32 into the residual sum
                out = tl.where(_kept(key, thr, row, D, dd), out / keep, 0.0)
            tl.store(y_ptr + yo[:, None] + dd[None, :], (x + out).to(y_ptr.dtype.element_ty), mask=ok[:, None])

    @triton.jit
    def _heads_backward(q, k, v, go, r, dd, T, scale, H: tl.constexpr, d: tl.constexpr, CAUSAL: tl.constexpr,
                        DT: tl.constexpr, PREC: tl.constexpr):
        """(dq, dk, dv), each (R, D) fp32, from the gradient go (R, D) at the heads' output: per head, p
        recomputed, dv = p^T go_h, dp = go_h v^T, ds = p (dp - rowsum(p dp)) scale, dq = ds k_h, dk = ds^T q_h,
        where x_h is x with the other heads' columns zeroed."""
        gq, gk, gv = tl.zeros(q.shape, tl.float32), tl.zeros(q.shape, tl.float32), tl.zeros(q.shape, tl.float32)
        for h in tl.static_range(H):
            mh = (dd // d == h)[None, :]
            qh, kh, goh = tl.where(mh, q, 0.0).to(DT), tl.where(mh, k, 0.0).to(DT), tl.where(mh, go, 0.0).to(DT)
            s = _scores(qh, k, r, T, scale, CAUSAL, DT, PREC)
            p = tl.exp(s - tl.max(s, 1)[:, None])
            p = p / tl.sum(p, 1)[:, None]  # (R, R)
            gv += tl.dot(tl.trans(p.to(DT)), goh, input_precision=PREC)
            gp = tl.dot(goh, tl.trans(v.to(DT)), input_precision=PREC)
            gs = (p * (gp - tl.sum(p * gp, 1)[:, None]) * scale).to(DT)
            gq += tl.dot(gs, kh, input_precision=PREC)
            gk += tl.dot(tl.trans(gs), qh, input_precision=PREC)
        return gq, gk, gv

    @triton.jit
    def _bwd_kernel(x_ptr, gy_ptr, lnw_ptr, lnb_ptr, wqkv_ptr, bqkv_ptr, wo_ptr, key_ptr, thr_ptr, keep_ptr, gx_ptr,
                    glnw_ptr, glnb_ptr, gwqkv_ptr, gbqkv_ptr, gwo_ptr, gbo_ptr, M, n_img, per_split, T, sB, sM, sT,
                    gB, gM, gT, oB, oM, oT, p_lnw, p_lnb, p_wqkv, p_bqkv, p_wo, eps, scale, D: tl.constexpr,
                    H: tl.constexpr, R: tl.constexpr, IMG: tl.constexpr, CAUSAL: tl.constexpr, DROP: tl.constexpr,
                    DT: tl.constexpr, PREC: tl.constexpr):
        m, split = tl.program_id(0), tl.program_id(1)
        r, dd = tl.arange(0, R), tl.arange(0, D)
        lnw, lnb = tl.load(lnw_ptr + m * p_lnw + dd), tl.load(lnb_ptr + m * p_lnb + dd)
        wqkv, bqkv = wqkv_ptr + m * p_wqkv, bqkv_ptr + m * p_bqkv
        w2d = dd[:, None] * D + dd[None, :]  # (D out, D in) entries of a (D, D) block
        wq, wk = tl.load(wqkv + w2d).to(DT), tl.load(wqkv + D * D + w2d).to(DT)
        wv = tl.load(wqkv + 2 * D * D + w2d).to(DT)
        wo = tl.load(wo_ptr + m * p_wo + w2d).to(DT)
        bq, bk = _round(tl.load(bqkv + dd), DT), _round(tl.load(bqkv + D + dd), DT)
        bv = _round(tl.load(bqkv + 2 * D + dd), DT)
        acc_q, acc_k = tl.zeros((D, D), tl.float32), tl.zeros((D, D), tl.float32)
        acc_v, acc_o = tl.zeros((D, D), tl.float32), tl.zeros((D, D), tl.float32)
        acc_bq, acc_bk = tl.zeros((D,), tl.float32), tl.zeros((D,), tl.float32)
        acc_bv, acc_bo = tl.zeros((D,), tl.float32), tl.zeros((D,), tl.float32)
        acc_lnw, acc_lnb = tl.zeros((D,), tl.float32), tl.zeros((D,), tl.float32)
        if DROP:
            key, thr, keep = tl.load(key_ptr + m), tl.load(thr_ptr + m), tl.load(keep_ptr + m)
        for s0 in range(split * per_split, tl.minimum(n_img, (split + 1) * per_split), IMG):
            xo, ok, row = _images(s0, n_img, T, m, sB, sM, sT, r, IMG)
            go, _, _ = _images(s0, n_img, T, m, gB, gM, gT, r, IMG)
            oo, _, _ = _images(s0, n_img, T, m, oB, oM, oT, r, IMG)
            x = tl.load(x_ptr + xo[:, None] + dd[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            xhat, rstd, ln = _norm(x, lnw, lnb, eps, D)
            ln = ln.to(DT)
            # q, k, v held in the products' dtype (bf16 values already): half the registers of fp32 tiles
            q = _proj(ln, tl.trans(wq), bq, DT, PREC).to(DT)
            k = _proj(ln, tl.trans(wk), bk, DT, PREC).to(DT)
            v = _proj(ln, tl.trans(wv), bv, DT, PREC).to(DT)
            o = _round(_heads_forward(q, k, v, r, dd, T, scale, H, D // H, CAUSAL, DT, PREC), DT).to(DT)
            gres = tl.load(gy_ptr + go[:, None] + dd[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            g = gres
            if DROP:
                g = tl.where(_kept(key, thr, row, D, dd), gres / keep, 0.0)
            g = g.to(DT)  # the gradient at the output projection, as its bf16 product receives it
            acc_o += tl.dot(tl.trans(g), o, input_precision=PREC)  # (D out, D in)
            acc_bo += tl.sum(g.to(tl.float32), 0)
            gattn = tl.dot(g, wo, input_precision=PREC).to(DT)  # (R, D) at the heads' output
            gq, gk, gv = _heads_backward(q, k, v, gattn, r, dd, T, scale, H, D // H, CAUSAL, DT, PREC)
            gq, gk, gv = gq.to(DT), gk.to(DT), gv.to(DT)  # torch's attention backward returns bf16
            acc_q += tl.dot(tl.trans(gq), ln, input_precision=PREC)
            acc_k += tl.dot(tl.trans(gk), ln, input_precision=PREC)
            acc_v += tl.dot(tl.trans(gv), ln, input_precision=PREC)
            acc_bq += tl.sum(gq.to(tl.float32), 0)
            acc_bk += tl.sum(gk.to(tl.float32), 0)
            acc_bv += tl.sum(gv.to(tl.float32), 0)
            gln = tl.dot(gq, wq, input_precision=PREC)  # one (R, 3 D) x (3 D, D) product in torch: one rounding
            gln = _round(tl.dot(gv, wv, input_precision=PREC, acc=tl.dot(gk, wk, input_precision=PREC, acc=gln)), DT)
            acc_lnw += tl.sum(gln * xhat, 0)
            acc_lnb += tl.sum(gln, 0)
            gx = gres + _norm_backward(gln, xhat, rstd, lnw, D)
            tl.store(gx_ptr + oo[:, None] + dd[None, :], gx.to(gx_ptr.dtype.element_ty), mask=ok[:, None])
        p = split * M + m  # this program's partial sums
        tl.store(gwqkv_ptr + p * (3 * D * D) + w2d, acc_q)
        tl.store(gwqkv_ptr + p * (3 * D * D) + D * D + w2d, acc_k)
        tl.store(gwqkv_ptr + p * (3 * D * D) + 2 * D * D + w2d, acc_v)
        tl.store(gbqkv_ptr + p * (3 * D) + dd, acc_bq)
        tl.store(gbqkv_ptr + p * (3 * D) + D + dd, acc_bk)
        tl.store(gbqkv_ptr + p * (3 * D) + 2 * D + dd, acc_bv)
        tl.store(gwo_ptr + p * (D * D) + w2d, acc_o)
        tl.store(gbo_ptr + p * D + dd, acc_bo)
        tl.store(glnw_ptr + p * D + dd, acc_lnw)
        tl.store(glnb_ptr + p * D + dd, acc_lnb)


def _check(x: torch.Tensor, wqkv: torch.Tensor, heads: int, *params: torch.Tensor) -> tuple[int, int, int, int]:
    if x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(f"attention block: x must be (B, M, T, D) with unit last stride, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")
    B, M, T, D = x.shape
    if tuple(wqkv.shape) != (M, 3 * D, D) or D % heads:
        raise ValueError(f"attention block: qkv weight must be (M, 3 D, D) = ({M}, {3 * D}, {D}) with D divisible "
                         f"by {heads} heads, got {tuple(wqkv.shape)}")
    _check_members("attention block", M, wqkv, *params)
    return B, M, T, D


def _meta(T: int, D: int, heads: int, causal: bool, bf16: bool) -> dict:
    """The kernels' constants: R rows a step, IMG = R // T whole images in them."""
    DT, PREC = dot_dtype(torch.bfloat16 if bf16 else torch.float32)
    R = max(16, pow2(T), ROWS)
    return dict(D=D, H=heads, R=R, IMG=R // T, CAUSAL=causal, DT=DT, PREC=PREC)


@torch.library.custom_op("weightzoo::attention_block", mutates_args=())
def _block_op(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, wqkv: torch.Tensor, bqkv: torch.Tensor,
              wo: torch.Tensor, bo: torch.Tensor, keys: Optional[torch.Tensor], thr: Optional[torch.Tensor],
              keep: Optional[torch.Tensor], heads: int, causal: bool, eps: float, bf16: bool) -> torch.Tensor:
    B, M, T, D = _check(x, wqkv, heads, ln_w, ln_b, bqkv, wo, bo)
    y = torch.empty_like(x)
    meta = _meta(T, D, heads, causal, bf16)
    n_split, per = _splits(M, B, meta["IMG"])  # whole steps of IMG images a split
    *drop, DROP = _drop_args(bo, keys, thr, keep)
    with on_device(x.device):
        launch(_fwd_kernel, (M, n_split), x, ln_w, ln_b, wqkv, bqkv, wo, bo, *drop, y, B, per, T, *x.stride()[:3],
               *y.stride()[:3], *(p.stride(0) for p in (ln_w, ln_b, wqkv, bqkv, wo, bo)), eps, (D // heads) ** -0.5,
               DROP=DROP, num_warps=WARPS[0], **meta)
    return y


@_block_op.register_fake
def _(x, ln_w, ln_b, wqkv, bqkv, wo, bo, keys, thr, keep, heads, causal, eps, bf16):
    _check(x, wqkv, heads)
    return torch.empty_like(x)


@torch.library.custom_op("weightzoo::attention_block_backward", mutates_args=())
def _backward_op(gy: torch.Tensor, x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, wqkv: torch.Tensor,
                 bqkv: torch.Tensor, wo: torch.Tensor, keys: Optional[torch.Tensor], thr: Optional[torch.Tensor],
                 keep: Optional[torch.Tensor], heads: int, causal: bool, eps: float, bf16: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor]:
    """(dx laid out as x, d ln_w, d ln_b, d wqkv, d bqkv, d wo, d bo), the parameter gradients fp32."""
    B, M, T, D = _check(x, wqkv, heads, ln_w, ln_b, bqkv, wo)
    gy = gy if gy.stride(-1) == 1 else gy.contiguous()
    gx = torch.empty_like(x)
    meta = _meta(T, D, heads, causal, bf16)
    n_split, per = _splits(M, B, meta["IMG"])  # whole steps of IMG images a split
    part = lambda *shape: torch.empty(n_split, M, *shape, device=x.device, dtype=torch.float32)
    glnw, glnb, gwqkv, gbqkv, gwo, gbo = part(D), part(D), part(3 * D, D), part(3 * D), part(D, D), part(D)
    *drop, DROP = _drop_args(wo, keys, thr, keep)
    with on_device(x.device):
        launch(_bwd_kernel, (M, n_split), x, gy, ln_w, ln_b, wqkv, bqkv, wo, *drop, gx, glnw, glnb, gwqkv, gbqkv,
               gwo, gbo, M, B, per, T, *x.stride()[:3], *gy.stride()[:3], *gx.stride()[:3],
               *(p.stride(0) for p in (ln_w, ln_b, wqkv, bqkv, wo)), eps, (D // heads) ** -0.5,
               DROP=DROP, num_warps=WARPS[1], **meta)
    return (gx, *(t.sum(0) for t in (glnw, glnb, gwqkv, gbqkv, gwo, gbo)))


@_backward_op.register_fake
def _(gy, x, ln_w, ln_b, wqkv, bqkv, wo, keys, thr, keep, heads, causal, eps, bf16):
    B, M, T, D = _check(x, wqkv, heads)
    e = lambda *shape: x.new_empty(M, *shape, dtype=torch.float32)
    return torch.empty_like(x), e(D), e(D), e(3 * D, D), e(3 * D), e(D, D), e(D)


def _setup(ctx, inputs, output):
    x, ln_w, ln_b, wqkv, bqkv, wo, bo, keys, thr, keep, heads, causal, eps, bf16 = inputs
    ctx.save_for_backward(x, ln_w, ln_b, wqkv, bqkv, wo, keys, thr, keep)  # the backward recomputes from x
    ctx.args = heads, causal, eps, bf16


def _backward(ctx, gy):
    gx, *grads = _backward_op(gy, *ctx.saved_tensors, *ctx.args)
    return (gx, *grads, None, None, None, None, None, None, None)


_block_op.register_autograd(_backward, setup_context=_setup)


def attention_block(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, wqkv: torch.Tensor, bqkv: torch.Tensor,
                    wo: torch.Tensor, bo: torch.Tensor, heads: int, causal: bool, eps: float, bf16: bool,
                    dropout: Dropout | None = None) -> torch.Tensor:
    """x (B, M, T, D) -> x + drop(out(attention(qkv(LayerNorm(x))))) per member (scale d ** -0.5, causal: position
    t attends to positions <= t), in x's dtype and layout. ln_w, ln_b (M, D), wqkv (M, 3 D, D), bqkv (M, 3 D),
    wo (M, D, D), bo (M, D) float32; `bf16`: products in bf16 as under autocast; `dropout`: the dropout layer's
    masks (`_mlp.Dropout`, one key row), none without. The caller checks `_triton.available(x.device)` and
    `supports(T, D, heads)`."""
    keys, thr, keep = (None, None, None) if dropout is None else dropout
    return _block_op(x, ln_w, ln_b, wqkv, bqkv, wo, bo, keys, thr, keep, heads, causal, eps, bf16)
