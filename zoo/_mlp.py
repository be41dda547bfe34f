"""A pre-norm transformer MLP block, y = x + drop(fc2(drop(act(fc1(LayerNorm(x)))))), for every member of a
population in one Triton kernel each way (vit_t's `Residual(LayerNorm, Linear, Activation, Dropout, Linear,
Dropout)`; the dropout masks are the engine's hashed ones, drawn in the kernels).

Unfused, the block is five passes over the (B, M, T, D) residual stream and its 2x wider hidden layer (layer norm,
two batched matmuls with the permuted copies around them, the activation, the residual add) and more backward;
on one H100 the layer norms and per-member GEMMs of vit_t took ~12 of its 31.6 ms a step (benchmarks/NOTES.md).
Here one program holds a member's (D, F) and (F, D) weights and runs its rows (image, token) in blocks of
BLOCK rows: the hidden layer never leaves the chip. The backward recomputes the forward from x (only x is saved)
and accumulates the member's weight gradients in registers over its rows; rows are split over programs only
where the members alone do not fill the GPU (partial sums added in a fixed order).

Count for vit_t (D 32, F 64, bf16 products, fp32 residual stream; 4,096 members x 64 images x 17 tokens =
4.46M rows a step): forward reads x and writes y, 2 x 570 MB; backward reads x and dy and writes dx, 3 x 570 MB:
~2.9 GB per block, ~0.6 ms at an H200's 4.8 TB/s. MACs: 3 x 2 x 4.46M x 2 x 32 x 64 ~ 110 GFLOP per block with
the recompute, ~0.15 ms on tensor cores. Measured on one H100 (commit 6dea7eb): ~1.6 ms forward and ~4.5 ms backward
per block, ~10x off those bytes; vit_t's step 31.6 -> 30.9 ms against the layers (benchmarks/NOTES.md). Compiled
for sm_90a (`benchmarks/kernel_registers.py`), those kernels used 255 registers a thread at 4 warps and the backward
spilled 772 bytes: selecting every member's activation by `tl.where` over all codes held a (R, F) mask per code,
and d w2 was a 32-row product on the older tensor-core path. One activation branch per program and d w2
accumulated transposed (64 rows) bring the forward to 168 registers (3 programs an SM) and the backward's spills to
332 bytes (247 registers and none at 8 warps, which measured slower). Measured on one H100 at vit_t's shapes
(`benchmarks/block_kernels.py`): forward 0.61 ms (1.86 TB/s of its bytes), backward 2.51 ms (0.68 TB/s; 3.75 at 8
warps); vit_t's step 30.9 -> 26.6 ms. `WARPS`, `BLOCK` and `PROGRAMS` are the launch knobs the script sweeps.

Numerics follow torch under bf16 autocast: the layer norm in fp32, products from bf16 operands accumulated in fp32
and rounded to bf16 as cuBLAS returns them, the bias added and the activation taken in bf16 (rounded as torch
rounds bf16 elementwise results), the residual sum in x's dtype. fp32 populations run exact fp32 products.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._directconv import ACTIVATION_CODES, activation_codes
from ._rng import kept_tl
from ._triton import dot_dtype, launch, on_device, pow2, tl, triton

# rows (image, token) a step of a program, (forward, backward). Compiled for sm_90a the backward spills 332 B at
# 64 rows and 4 warps, nothing at 16 (164 registers; benchmarks/NOTES.md section 4): 16 is timed against 64 by
# `zoo_throughput.py --mlp-bwd-rows 64,16`
BLOCK = (64, 64)
PROGRAMS = 2048  # programs a launch aims for: rows are split over programs while members alone are fewer
# warps a program, (forward, backward): 4 each measured fastest on an H100 (backward 2.51 ms against 3.75 at 8,
# where it has no spills; benchmarks/NOTES.md)
WARPS = (4, 4)
# activations by code: the direct convs' (relu, tanh, sigmoid, leaky relu) and two whose derivative needs the
# pre-activation z, which the backward recomputes here
CODES = {**ACTIVATION_CODES, "gelu": 5, "silu": 6}


def supports(D: int, F: int) -> bool:
    """Widths one program's tiles hold: powers of two from tl.dot's 16 to 128."""
    return all(16 <= n <= 128 and n == pow2(n) for n in (D, F))


class Dropout(NamedTuple):
    """The engine's hashed dropout (`zoo.engine._dropout`) for the kernels: per dropout layer of the block its
    members' keys, keys (n layers, M) int64; each member's threshold ceil(rate 2^32) (M,) int64 (an element is kept
    where its hash reaches it) and keep probability 1 - rate (M,) float32."""
    keys: torch.Tensor
    thr: torch.Tensor
    keep: torch.Tensor


def codes(names, device: torch.device | str) -> torch.Tensor | None:
    """(M,) int32 activation codes (CODES), or None when one of `names` has no code here."""
    return activation_codes(names, device, CODES)


if triton is not None:
    @triton.jit
    def _round(v, DT: tl.constexpr):
        """v (fp32) rounded to the products' dtype and back: where torch would hold a bf16 tensor."""
        return v.to(DT).to(tl.float32)

    @triton.jit
    def _kept(key, thr, r, n_cols, col):
        """(R, C) the engine's dropout mask of rows r (image * T + token) and columns col of a member's
        (B, T, n_cols) activation: element index r * n_cols + col."""
        return kept_tl(key, thr, r.to(tl.int64)[:, None] * n_cols + col[None, :])

    @triton.jit
    def _act(z, code):
        """Activation `code` (CODES) of fp32 z, one branch per program (its member's code): the direct convs' formulas
        (`_directconv._act`), then exact (erf) gelu and silu. The direct convs select among all codes with
        `tl.where`, which measured faster there (cnn_gap 378.9 against 355.1 model-epochs/s branched, one H100); in
        this loop the selects' masks cost ~90 registers a thread (168 -> 255 in the forward)."""
        if code == 1:
            y = tl.maximum(z, 0.0)
        elif code == 2:
            y = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        elif code == 3:
            y = tl.sigmoid(z)
        elif code == 4:
            y = tl.where(z < 0, z * 0.01, z)
        elif code == 5:
            y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        elif code == 6:
            y = z * tl.sigmoid(z)
        else:
            y = z
        return y

    @triton.jit
    def _act_grad(z, code):
        """d act(z) / dz, fp32."""
        if code == 1:
            d = tl.where(z > 0, 1.0, 0.0)
        elif code == 2:
            t = 2.0 * tl.sigmoid(2.0 * z) - 1.0
            d = 1.0 - t * t
        elif code == 3:
            s = tl.sigmoid(z)
            d = s * (1.0 - s)
        elif code == 4:
            d = tl.where(z < 0, 0.01, 1.0)
        elif code == 5:
            d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
        elif code == 6:
            s = tl.sigmoid(z)
            d = s * (1.0 + z * (1.0 - s))
        else:
            d = tl.full(z.shape, 1.0, tl.float32)
        return d

    @triton.jit
    def _rows(r0, n_rows, m, T, sB, sM, sT, BLOCK: tl.constexpr):
        """(in range, element offset of the row's first entry) for the BLOCK rows r0.. of member m; row = image * T
        + token."""
        r = r0 + tl.arange(0, BLOCK)
        return r < n_rows, (r // T).to(tl.int64) * sB + m.to(tl.int64) * sM + (r % T) * sT

    @triton.jit
    def _norm(x, lnw, lnb, eps, D: tl.constexpr):
        """Layer norm of the (R, D) rows x: (xhat, rstd, xhat * lnw + lnb)."""
        mean = tl.sum(x, 1) / D
        xc = x - mean[:, None]
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
        xhat = xc * rstd[:, None]
        return xhat, rstd, xhat * lnw[None, :] + lnb[None, :]

    @triton.jit
    def _norm_backward(gln, xhat, rstd, lnw, D: tl.constexpr):
        """The gradient at the layer norm's input from gln (R, D) at its output, with xhat and rstd of `_norm`."""
        gxh = gln * lnw[None, :]
        return rstd[:, None] * (gxh - (tl.sum(gxh, 1) / D)[:, None] - xhat * (tl.sum(gxh * xhat, 1) / D)[:, None])

    @triton.jit
    def _hidden(ln, w1t, b1, code, DT: tl.constexpr, PREC: tl.constexpr):
        """(z, act(z)), (R, F) fp32 holding bf16-rounded values under bf16: fc1 of the normed rows."""
        z = _round(_round(tl.dot(ln.to(DT), w1t, input_precision=PREC), DT) + b1[None, :], DT)
        return z, _round(_act(z, code), DT)

    @triton.jit
    def _fwd_kernel(x_ptr, lnw_ptr, lnb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, code_ptr, key_ptr, thr_ptr, keep_ptr,
                    y_ptr, M, n_rows, per_split, T, sB, sM, sT, yB, yM, yT, p_lnw, p_lnb, p_w1, p_b1, p_w2, p_b2, eps,
                    D: tl.constexpr, F: tl.constexpr, BLOCK: tl.constexpr, DROP: tl.constexpr,
                    DT: tl.constexpr, PREC: tl.constexpr):
        m, split = tl.program_id(0), tl.program_id(1)
        d, f = tl.arange(0, D), tl.arange(0, F)
        code = tl.load(code_ptr + m)
        lnw, lnb = tl.load(lnw_ptr + m * p_lnw + d), tl.load(lnb_ptr + m * p_lnb + d)
        w1t = tl.load(w1_ptr + m * p_w1 + f[None, :] * D + d[:, None]).to(DT)  # (D, F) = w1[m]^T
        w2t = tl.load(w2_ptr + m * p_w2 + d[None, :] * F + f[:, None]).to(DT)  # (F, D) = w2[m]^T
        b1 = _round(tl.load(b1_ptr + m * p_b1 + f), DT)
        b2 = _round(tl.load(b2_ptr + m * p_b2 + d), DT)
        if DROP:  # the two dropout layers' keys, the member's threshold and keep probability
            k1, k2 = tl.load(key_ptr + m), tl.load(key_ptr + M + m)
            thr, keep = tl.load(thr_ptr + m), tl.load(keep_ptr + m)
        for r0 in range(split * per_split, tl.minimum(n_rows, (split + 1) * per_split), BLOCK):
            ok, xo = _rows(r0, n_rows, m, T, sB, sM, sT, BLOCK)
            _, yo = _rows(r0, n_rows, m, T, yB, yM, yT, BLOCK)
            x = tl.load(x_ptr + xo[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)  # (R, D)
            _, _, ln = _norm(x, lnw, lnb, eps, D)
            _, h = _hidden(ln, w1t, b1, code, DT, PREC)
            if DROP:  # x * mask / keep in fp32, rounded as fc2's bf16 input
                h = _round(tl.where(_kept(k1, thr, r0 + tl.arange(0, BLOCK), F, f), h / keep, 0.0), DT)
            out = _round(_round(tl.dot(h.to(DT), w2t, input_precision=PREC), DT) + b2[None, :], DT)
            if DROP:  # fp32 into the residual sum
                out = tl.where(_kept(k2, thr, r0 + tl.arange(0, BLOCK), D, d), out / keep, 0.0)
            tl.store(y_ptr + yo[:, None] + d[None, :], (x + out).to(y_ptr.dtype.element_ty), mask=ok[:, None])

    @triton.jit
    def _bwd_kernel(x_ptr, gy_ptr, lnw_ptr, lnb_ptr, w1_ptr, b1_ptr, w2_ptr, code_ptr, key_ptr, thr_ptr, keep_ptr,
                    gx_ptr, glnw_ptr,
                    glnb_ptr, gw1_ptr, gb1_ptr, gw2_ptr, gb2_ptr, M, n_rows, per_split, T, sB, sM, sT, gB, gM, gT,
                    oB, oM, oT, p_lnw, p_lnb, p_w1, p_b1, p_w2, eps, D: tl.constexpr, F: tl.constexpr,
                    BLOCK: tl.constexpr, DROP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
        m, split = tl.program_id(0), tl.program_id(1)
        d, f = tl.arange(0, D), tl.arange(0, F)
        code = tl.load(code_ptr + m)
        lnw, lnb = tl.load(lnw_ptr + m * p_lnw + d), tl.load(lnb_ptr + m * p_lnb + d)
        w1 = tl.load(w1_ptr + m * p_w1 + f[:, None] * D + d[None, :]).to(DT)  # (F, D)
        w2 = tl.load(w2_ptr + m * p_w2 + d[:, None] * F + f[None, :]).to(DT)  # (D, F)
        b1 = _round(tl.load(b1_ptr + m * p_b1 + f), DT)
        acc_w1, acc_w2t = tl.zeros((F, D), tl.float32), tl.zeros((F, D), tl.float32)
        acc_b1, acc_b2 = tl.zeros((F,), tl.float32), tl.zeros((D,), tl.float32)
        acc_lnw, acc_lnb = tl.zeros((D,), tl.float32), tl.zeros((D,), tl.float32)
        if DROP:
            k1, k2 = tl.load(key_ptr + m), tl.load(key_ptr + M + m)
            thr, keep = tl.load(thr_ptr + m), tl.load(keep_ptr + m)
        for r0 in range(split * per_split, tl.minimum(n_rows, (split + 1) * per_split), BLOCK):
            ok, xo = _rows(r0, n_rows, m, T, sB, sM, sT, BLOCK)
            _, go = _rows(r0, n_rows, m, T, gB, gM, gT, BLOCK)
            _, oo = _rows(r0, n_rows, m, T, oB, oM, oT, BLOCK)
            x = tl.load(x_ptr + xo[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            xhat, rstd, ln = _norm(x, lnw, lnb, eps, D)
            z, h = _hidden(ln, tl.trans(w1), b1, code, DT, PREC)  # (R, F) each
            g = tl.load(gy_ptr + go[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)  # (R, D)
            g2 = g
            if DROP:
                r = r0 + tl.arange(0, BLOCK)
                h = _round(tl.where(_kept(k1, thr, r, F, f), h / keep, 0.0), DT)  # fc2's input
                g2 = tl.where(_kept(k2, thr, r, D, d), g / keep, 0.0)
            g2 = g2.to(DT)  # the gradient at fc2's output, as its bf16 product receives it; 0 in masked rows
            # (F, D) = d w2^T: F = 64 rows take the wgmma path; D = 32 rows took the register-operand one (spills)
            acc_w2t += tl.dot(tl.trans(h.to(DT)), g2, input_precision=PREC)
            acc_b2 += tl.sum(g2.to(tl.float32), 0)
            gh = _round(tl.dot(g2, w2, input_precision=PREC), DT)  # (R, F) at fc2's input
            if DROP:
                gh = _round(tl.where(_kept(k1, thr, r, F, f), gh / keep, 0.0), DT)  # at act's output
            gz = _round(gh * _act_grad(z, code), DT).to(DT)  # (R, F) at fc1's output
            acc_w1 += tl.dot(tl.trans(gz), ln.to(DT), input_precision=PREC)  # (F, D)
            acc_b1 += tl.sum(gz.to(tl.float32), 0)
            gln = _round(tl.dot(gz, w1, input_precision=PREC), DT)  # (R, D) at the layer norm's output
            acc_lnw += tl.sum(gln * xhat, 0)
            acc_lnb += tl.sum(gln, 0)
            gx = g + _norm_backward(gln, xhat, rstd, lnw, D)
            tl.store(gx_ptr + oo[:, None] + d[None, :], gx.to(gx_ptr.dtype.element_ty), mask=ok[:, None])
        p = split * M + m  # this program's partial sums
        tl.store(gw1_ptr + p * (F * D) + f[:, None] * D + d[None, :], acc_w1)
        tl.store(gw2_ptr + p * (D * F) + d[None, :] * F + f[:, None], acc_w2t)
        tl.store(gb1_ptr + p * F + f, acc_b1)
        tl.store(gb2_ptr + p * D + d, acc_b2)
        tl.store(glnw_ptr + p * D + d, acc_lnw)
        tl.store(glnb_ptr + p * D + d, acc_lnb)


def _check(x: torch.Tensor, w1: torch.Tensor, *params: torch.Tensor) -> tuple[int, int, int, int, int]:
    if x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(f"residual mlp: x must be (B, M, T, D) with unit last stride, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")
    B, M, T, D = x.shape
    if tuple(w1.shape[::2]) != (M, D):
        raise ValueError(f"residual mlp: fc1 weight must be (M, F, D) = ({M}, F, {D}), got {tuple(w1.shape)}")
    _check_members("residual mlp", M, w1, *params)
    return B, M, T, D, w1.shape[1]


def _check_members(what: str, M: int, *params: torch.Tensor) -> None:
    """Per-member parameters (M, ...), e.g. views of the (M, P) flat buffer: any member stride, each member's
    entries contiguous (the kernels index them so)."""
    for p in params:
        if len(p) != M or not p[0].is_contiguous():
            raise ValueError(f"{what}: parameters must be (M={M}, ...) with each member's entries contiguous, got "
                             f"shape {tuple(p.shape)} strides {p.stride()}")


def _splits(M: int, n: int, unit: int) -> tuple[int, int]:
    """(programs per member, work items each, a multiple of `unit`) for n items a member (rows, images): about
    PROGRAMS programs where members alone are fewer."""
    n_split = max(1, min(triton.cdiv(n, unit), triton.cdiv(PROGRAMS, M)))
    per = triton.cdiv(triton.cdiv(n, n_split), unit) * unit
    return triton.cdiv(n, per), per


def _drop_args(codes: torch.Tensor, keys: Optional[torch.Tensor], thr: Optional[torch.Tensor],
               keep: Optional[torch.Tensor]) -> tuple:
    """The kernels' (key, threshold, keep) pointers and DROP flag; without dropout, placeholders never read."""
    return (keys, thr, keep, True) if keys is not None else (codes, codes, codes, False)


@torch.library.custom_op("weightzoo::residual_mlp", mutates_args=())
def _mlp_op(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
            w2: torch.Tensor, b2: torch.Tensor, codes: torch.Tensor, keys: Optional[torch.Tensor],
            thr: Optional[torch.Tensor], keep: Optional[torch.Tensor], eps: float, bf16: bool) -> torch.Tensor:
    B, M, T, D, F = _check(x, w1, ln_w, ln_b, b1, w2, b2)
    y = torch.empty_like(x)
    n_rows = B * T
    n_split, per = _splits(M, n_rows, BLOCK[0])
    DT, PREC = dot_dtype(torch.bfloat16 if bf16 else torch.float32)
    *drop, DROP = _drop_args(codes, keys, thr, keep)
    with on_device(x.device):
        launch(_fwd_kernel, (M, n_split), x, ln_w, ln_b, w1, b1, w2, b2, codes, *drop, y, M, n_rows, per, T,
               *x.stride()[:3], *y.stride()[:3],
               *(p.stride(0) for p in (ln_w, ln_b, w1, b1, w2, b2)), eps, D=D, F=F, BLOCK=BLOCK[0], DROP=DROP,
               DT=DT, PREC=PREC, num_warps=WARPS[0])
    return y


@_mlp_op.register_fake
def _(x, ln_w, ln_b, w1, b1, w2, b2, codes, keys, thr, keep, eps, bf16):
    _check(x, w1)
    return torch.empty_like(x)


@torch.library.custom_op("weightzoo::residual_mlp_backward", mutates_args=())
def _backward_op(gy: torch.Tensor, x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, w1: torch.Tensor,
                 b1: torch.Tensor, w2: torch.Tensor, codes: torch.Tensor, keys: Optional[torch.Tensor],
                 thr: Optional[torch.Tensor], keep: Optional[torch.Tensor], eps: float, bf16: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor]:
    """(dx laid out as x, d ln_w, d ln_b, d w1, d b1, d w2, d b2), the parameter gradients fp32."""
    B, M, T, D, F = _check(x, w1, ln_w, ln_b, b1, w2)
    gy = gy if gy.stride(-1) == 1 else gy.contiguous()
    gx = torch.empty_like(x)
    n_rows = B * T
    n_split, per = _splits(M, n_rows, BLOCK[1])
    part = lambda *shape: torch.empty(n_split, M, *shape, device=x.device, dtype=torch.float32)
    glnw, glnb, gw1, gb1, gw2, gb2 = part(D), part(D), part(F, D), part(F), part(D, F), part(D)
    DT, PREC = dot_dtype(torch.bfloat16 if bf16 else torch.float32)
    *drop, DROP = _drop_args(codes, keys, thr, keep)
    with on_device(x.device):
        launch(_bwd_kernel, (M, n_split), x, gy, ln_w, ln_b, w1, b1, w2, codes, *drop, gx, glnw, glnb, gw1, gb1,
               gw2, gb2, M, n_rows, per, T, *x.stride()[:3], *gy.stride()[:3], *gx.stride()[:3],
               *(p.stride(0) for p in (ln_w, ln_b, w1, b1, w2)), eps, D=D, F=F, BLOCK=BLOCK[1],
               DROP=DROP, DT=DT, PREC=PREC, num_warps=WARPS[1])
    return (gx, *(t.sum(0) for t in (glnw, glnb, gw1, gb1, gw2, gb2)))


@_backward_op.register_fake
def _(gy, x, ln_w, ln_b, w1, b1, w2, codes, keys, thr, keep, eps, bf16):
    B, M, T, D, F = _check(x, w1)
    e = lambda *shape: x.new_empty(M, *shape, dtype=torch.float32)
    return torch.empty_like(x), e(D), e(D), e(F, D), e(F), e(D, F), e(D)


def _setup(ctx, inputs, output):
    x, ln_w, ln_b, w1, b1, w2, b2, codes, keys, thr, keep, eps, bf16 = inputs
    ctx.save_for_backward(x, ln_w, ln_b, w1, b1, w2, codes, keys, thr, keep)  # the backward recomputes from x
    ctx.eps, ctx.bf16 = eps, bf16


def _backward(ctx, gy):
    gx, *grads = _backward_op(gy, *ctx.saved_tensors, ctx.eps, ctx.bf16)
    return (gx, *grads, None, None, None, None, None, None)


_mlp_op.register_autograd(_backward, setup_context=_setup)


def residual_mlp(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                 w2: torch.Tensor, b2: torch.Tensor, codes: torch.Tensor, eps: float, bf16: bool,
                 dropout: Dropout | None = None) -> torch.Tensor:
    """x (B, M, T, D) -> x + drop(fc2(drop(act(fc1(LayerNorm(x)))))) per member, in x's dtype and layout. ln_w,
    ln_b (M, D), w1 (M, F, D), b1 (M, F), w2 (M, D, F), b2 (M, D) float32; codes (M,) int32 (`codes`); `bf16`:
    products in bf16 as under autocast; `dropout`: the two dropout layers' masks (`Dropout`), none without. The
    caller checks `_triton.available(x.device)` and `supports(D, F)`."""
    keys, thr, keep = (None, None, None) if dropout is None else dropout
    return _mlp_op(x, ln_w, ln_b, w1, b1, w2, b2, codes, keys, thr, keep, eps, bf16)
