"""Fused per-member convolution + max-pool for the population trainer, as Triton kernels.

`conv_pool(x, w, b, stride, padding, pool)` is `max_pool2d(conv2d(x_m, w_m, b_m), pool)` for every member
m at once. Activations are `(B, M, C, H, W)`. The kernels are implicit GEMMs: each program gathers the
patches of a tile of output pixels straight from `x` (no im2col matrix in memory), multiplies them by
its member's weights on tensor cores, and keeps only the pooled maximum and which of the pool's
positions won (int8). The backward recomputes nothing: weight and input gradients gather the pooled
gradient through the saved winner index, so the full-resolution conv output never exists.

Why: with one input channel per member, PyTorch's grouped conv runs depthwise kernels at ~2.6 TFLOP/s,
and im2col moves 14,400 values per image-member for cnn_s's first layer (benchmarks/NOTES.md).
Without Triton (CPU) the same op falls back to grouped conv + max-pool; with TRITON_INTERPRET=1 the
kernels run on CPU tensors (that is how the tests check them).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch fallback below
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_R, BLOCK_K = 64, 32


def available(device: torch.device) -> bool:
    """Whether the Triton kernels run for tensors on `device`."""
    return triton is not None and (device.type == "cuda" or INTERPRET)


if triton is not None:
    @triton.jit
    def _patch_offsets(r, kk, Hq, Wq, H, W, K, KS: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr,
                       P: tl.constexpr, d: tl.constexpr, n_rows):
        """Offsets into one image-member's (C, H, W) block of the patch values of pooled output pixel
        r at pool position d, and the mask of in-bounds ones. r (R,), kk (K_blk,) -> (R, K_blk)."""
        q = r % (Hq * Wq)
        iy = ((q // Wq) * P + d // P) * S - PAD  # top-left input pixel of the patch
        ix = ((q % Wq) * P + d % P) * S - PAD
        c, ky, kx = kk // (KS * KS), (kk // KS) % KS, kk % KS
        y = iy[:, None] + ky[None, :]
        x = ix[:, None] + kx[None, :]
        ok = (r < n_rows)[:, None] & (kk < K)[None, :] & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        return c[None, :] * (H * W) + y * W + x, ok

    @triton.jit
    def _fwd_kernel(x_ptr, w_ptr, b_ptr, z_ptr, arg_ptr, M, C, H, W, O, Hq, Wq, n_rows,
                    KS: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr, P: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
        m = tl.program_id(0)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows: (image, pooled pixel)
        o = tl.arange(0, BLOCK_O)
        K = C * KS * KS
        img = (r // (Hq * Wq)).to(tl.int64) * M + m  # (R,) image-member index into (B, M, ...)
        best = tl.full((BLOCK_R, BLOCK_O), float("-inf"), tl.float32)
        arg = tl.zeros((BLOCK_R, BLOCK_O), tl.int32)
        for d in tl.static_range(P * P):  # pool positions, row-major: the first maximum wins, as in torch
            acc = tl.zeros((BLOCK_R, BLOCK_O), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                off, ok = _patch_offsets(r, kk, Hq, Wq, H, W, K, KS, S, PAD, P, d, n_rows)
                a = tl.load(x_ptr + img[:, None] * (C * H * W) + off, mask=ok, other=0.0)  # (R, K_blk)
                wt = tl.load(w_ptr + m * (O * K) + o[None, :] * K + kk[:, None],
                             mask=(kk < K)[:, None] & (o < O)[None, :], other=0.0)  # (K_blk, O)
                acc += tl.dot(a.to(DOT_DTYPE), wt.to(DOT_DTYPE), input_precision=PREC)
            win = (acc > best) | (acc != acc)  # NaN propagates, as in max_pool2d
            best = tl.where(win, acc, best)
            arg = tl.where(win, d, arg)
        best += tl.load(b_ptr + m * O + o, mask=o < O, other=0.0)[None, :]
        q = r % (Hq * Wq)
        out = img[:, None] * (O * Hq * Wq) + o[None, :] * (Hq * Wq) + q[:, None]  # (B, M, O, Hq, Wq)
        ok = (r < n_rows)[:, None] & (o < O)[None, :]
        tl.store(z_ptr + out, best.to(z_ptr.dtype.element_ty), mask=ok)
        if P > 1:
            tl.store(arg_ptr + out, arg.to(tl.int8), mask=ok)

    @triton.jit
    def _dw_kernel(x_ptr, gz_ptr, arg_ptr, dw_ptr, db_ptr, M, C, H, W, O, Hq, Wq, n_rows,
                   KS: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr, P: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
        """Partial weight/bias gradients of member m over every n_split-th row block, one K chunk."""
        m, split, kc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_split = tl.num_programs(1)
        o = tl.arange(0, BLOCK_O)
        K = C * KS * KS
        kk = kc * BLOCK_K + tl.arange(0, BLOCK_K)
        dw = tl.zeros((BLOCK_K, BLOCK_O), tl.float32)
        db = tl.zeros((BLOCK_O,), tl.float32)
        for r0 in range(split * BLOCK_R, n_rows, n_split * BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            img = (r // (Hq * Wq)).to(tl.int64) * M + m
            out = img[:, None] * (O * Hq * Wq) + o[None, :] * (Hq * Wq) + (r % (Hq * Wq))[:, None]
            ok = (r < n_rows)[:, None] & (o < O)[None, :]
            g = tl.load(gz_ptr + out, mask=ok, other=0.0).to(tl.float32)  # (R, O)
            db += tl.sum(g, 0)
            win = tl.load(arg_ptr + out, mask=ok, other=0).to(tl.int32) if P > 1 else tl.zeros_like(o)[None, :]
            for d in tl.static_range(P * P):
                off, okx = _patch_offsets(r, kk, Hq, Wq, H, W, K, KS, S, PAD, P, d, n_rows)
                a = tl.load(x_ptr + img[:, None] * (C * H * W) + off, mask=okx, other=0.0)  # (R, K_blk)
                gd = tl.where(win == d, g, 0.0)
                dw += tl.dot(tl.trans(a.to(DOT_DTYPE)), gd.to(DOT_DTYPE), input_precision=PREC)
        part = (split * M + m).to(tl.int64)
        tl.store(dw_ptr + part * (O * K) + o[None, :] * K + kk[:, None], dw,
                 mask=(kk < K)[:, None] & (o < O)[None, :])
        if kc == 0:
            tl.store(db_ptr + part * O + o, db, mask=o < O)

    @triton.jit
    def _dx_kernel(gz_ptr, arg_ptr, w_ptr, dx_ptr, M, C, H, W, O, Hq, Wq, n_rows,
                   KS: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr, P: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
        """Input gradient: rows are input pixels (image, y, x); K runs over (o, ky, kx)."""
        m = tl.program_id(0)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        iy, ix = (r % (H * W)) // W, r % W
        img = (r // (H * W)).to(tl.int64) * M + m
        K = O * KS * KS
        acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            o, ky, kx = kk // (KS * KS), (kk // KS) % KS, kk % KS
            sy = iy[:, None] + PAD - ky[None, :]  # conv output pixel (times stride) this tap came from
            sx = ix[:, None] + PAD - kx[None, :]
            oy, ox = sy // S, sx // S
            ok = ((r < n_rows)[:, None] & (kk < K)[None, :] & (sy >= 0) & (sx >= 0) & (sy % S == 0) & (sx % S == 0)
                  & (oy < Hq * P) & (ox < Wq * P))  # rows/cols the pool drops get no gradient
            out = img[:, None] * (O * Hq * Wq) + o[None, :] * (Hq * Wq) + (oy // P) * Wq + ox // P
            g = tl.load(gz_ptr + out, mask=ok, other=0.0).to(tl.float32)  # (R, K_blk)
            if P > 1:
                win = tl.load(arg_ptr + out, mask=ok, other=0).to(tl.int32)
                g = tl.where(win == (oy % P) * P + ox % P, g, 0.0)
            wt = tl.load(w_ptr + m * (O * C * KS * KS) + o[:, None] * (C * KS * KS) + c[None, :] * (KS * KS)
                         + (ky * KS + kx)[:, None], mask=(kk < K)[:, None] & (c < C)[None, :], other=0.0)
            acc += tl.dot(g.to(DOT_DTYPE), wt.to(DOT_DTYPE), input_precision=PREC)
        dst = img[:, None] * (C * H * W) + c[None, :] * (H * W) + (r % (H * W))[:, None]
        tl.store(dx_ptr + dst, acc.to(dx_ptr.dtype.element_ty), mask=(r < n_rows)[:, None] & (c < C)[None, :])


def _geometry(x, w, stride, padding, pool):
    B, M, C, H, W = x.shape
    O, KS = w.shape[1], w.shape[-1]
    Ho, Wo = (H + 2 * padding - KS) // stride + 1, (W + 2 * padding - KS) // stride + 1
    return B, M, C, H, W, O, KS, Ho // pool, Wo // pool


def _dot_dtype(dtype: torch.dtype):
    """bf16 tensor cores for bf16 activations; exact fp32 (no TF32) otherwise, to match torch's fp32 conv."""
    if dtype == torch.bfloat16 and not INTERPRET:  # the interpreter's bf16 dot is wrong (triton 3.6)
        return tl.bfloat16, "tf32"
    return tl.float32, "ieee"


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _fwd_triton(x, w, b, stride, padding, pool):
    B, M, C, H, W, O, KS, Hq, Wq = _geometry(x, w, stride, padding, pool)
    z = torch.empty(B, M, O, Hq, Wq, device=x.device, dtype=x.dtype)
    arg = torch.empty(z.shape if pool > 1 else (0,), device=x.device, dtype=torch.int8)
    n_rows = B * Hq * Wq
    dt, prec = _dot_dtype(x.dtype)
    _fwd_kernel[(M, triton.cdiv(n_rows, BLOCK_R))](
        x, w, b, z, arg, M, C, H, W, O, Hq, Wq, n_rows, KS, stride, padding, pool,
        BLOCK_R, BLOCK_K, _block(O), dt, prec)
    return z, arg


def _bwd_triton(gz, arg, x, w, stride, padding, pool, need_dx):
    B, M, C, H, W, O, KS, Hq, Wq = _geometry(x, w, stride, padding, pool)
    gz = gz.contiguous()
    dt, prec = _dot_dtype(x.dtype)
    n_rows = B * Hq * Wq
    n_split = max(1, min(triton.cdiv(n_rows, BLOCK_R), triton.cdiv(2048, M)))  # enough programs to fill the GPU
    K = C * KS * KS
    dw = torch.empty(n_split, M, O, K, device=x.device, dtype=torch.float32)
    db = torch.empty(n_split, M, O, device=x.device, dtype=torch.float32)
    _dw_kernel[(M, n_split, triton.cdiv(K, BLOCK_K))](
        x, gz, arg, dw, db, M, C, H, W, O, Hq, Wq, n_rows, KS, stride, padding, pool,
        BLOCK_R, BLOCK_K, _block(O), dt, prec)
    dx = None
    if need_dx:
        dx = torch.empty_like(x)
        _dx_kernel[(M, triton.cdiv(B * H * W, BLOCK_R))](
            gz, arg, w, dx, M, C, H, W, O, Hq, Wq, B * H * W, KS, stride, padding, pool,
            BLOCK_R, BLOCK_K, _block(C), dt, prec)
    return dx, dw.sum(0).view(w.shape), db.sum(0)


def _reference(x, w, b, stride, padding, pool):
    """The same function from stock PyTorch ops (grouped conv + max-pool): fallback and test oracle."""
    B, M, C, H, W = x.shape
    y = F.conv2d(x.reshape(B, M * C, H, W), w.reshape(-1, *w.shape[2:]).to(x.dtype), b.reshape(-1).to(x.dtype),
                 stride=stride, padding=padding, groups=M)
    if pool > 1:
        y = F.max_pool2d(y, pool)
    return y.view(B, M, w.shape[1], *y.shape[-2:])


class _ConvPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, stride, padding, pool):
        z, arg = _fwd_triton(x.contiguous(), w.contiguous(), b.contiguous(), stride, padding, pool)
        ctx.save_for_backward(x, w, arg)
        ctx.geometry = (stride, padding, pool)
        return z

    @staticmethod
    def backward(ctx, gz):
        x, w, arg = ctx.saved_tensors
        dx, dw, db = _bwd_triton(gz, arg, x.contiguous(), w.contiguous(), *ctx.geometry, ctx.needs_input_grad[0])
        return dx, dw, db, None, None, None


def conv_pool(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: int = 1, padding: int = 0,
              pool: int = 1) -> torch.Tensor:
    """x (B, M, C, H, W), w (M, O, C, k, k), b (M, O) -> (B, M, O, H', W') = maxpool(conv(x)) per member.
    Runs in x's dtype (bf16: tensor cores, fp32 accumulation; fp32: exact fp32 products)."""
    if not available(x.device):
        return _reference(x, w, b, stride, padding, pool)
    return _ConvPool.apply(x, w, b, stride, padding, pool)
