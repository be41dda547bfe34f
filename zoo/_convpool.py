"""Fused per-member convolution + max-pool for the population trainer, as Triton kernels.

`conv_pool(x, w, b, stride, padding, pool)` is `max_pool2d(conv2d(x_m, w_m, b_m), pool)` for every member
m at once. Activations are `(B, M, C, H, W)`. The kernels are "band" GEMMs (the Toeplitz form of a conv):
a row is (image, pooled output row, chunk of XQ pooled columns); its band is the SP input rows under it,
per channel, each a contiguous run of XWP input columns, so the kernel reads the input with vector loads
instead of gathering patch values one by one. One tensor-core GEMM, band (R, C*SP*XWP) @ t[m], where the
banded matrix t[m] holds the member's kernel at every (pool position, pooled column), gives all P*P pool
positions of the chunk; the kernel keeps the max and which position won (int8). The full-resolution conv
output never exists in memory.
Backward: the band-matrix gradient band^T @ (pooled gradient routed to the winning position), folded onto
the weights by a fixed gather-sum (deterministic); the input gradient is a band conv (no pool) of the
unpooled gradient with the flipped kernel. t costs redundant MACs (zeros of the Toeplitz structure) but
tensor cores have plenty; loads were the bottleneck: cnn_s at batch 64 went from 21.9 to 10.6 ms per step
against gathered-patch kernels (benchmarks/NOTES.md, "Design").

Without Triton (CPU) the same op falls back to grouped conv + max-pool; with TRITON_INTERPRET=1 the
kernels run on CPU tensors (that is how the tests check them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._directconv import Dropout, direct_conv
from ._triton import (
    MAX_GRID_Y,
    NUM_WARPS,
    available,
    dot_dtype,
    launch,
    on_device,
    pow2,
    precompile,
    recording,
    stages,
    tl,
    triton,
)

__all__ = ["available", "conv_pool", "precompile", "recording"]
BAND_R, BAND_R_DT = 64, 128  # rows per program (forward, band gradient); measured on an H100

if triton is not None:
    @triton.jit
    def _band_rows(r, M, XM, m, C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, Hq: tl.constexpr,
                   S: tl.constexpr, P: tl.constexpr, XQ: tl.constexpr, NXC: tl.constexpr):
        """Rows r = (image, pooled row yq, chunk xc of XQ pooled columns) -> (R,) offset of the band's
        top-left input value, its first input column, (image, member) output index, yq, xc. The input has
        XM = M members, or XM = 1 when every member reads the same images (evaluation)."""
        xc = r % NXC
        yq = (r // NXC) % Hq
        image = (r // (NXC * Hq)).to(tl.int64)
        x0 = xc * (XQ * P * S)
        base = (image * XM + m % XM) * (C * H * W) + yq * (P * S * W) + x0
        return base, x0, image * M + m, yq, xc

    @triton.jit
    def _band_tile(x_ptr, base, x0, rok, k0, C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                   SP: tl.constexpr, XWP: tl.constexpr, BLOCK_K: tl.constexpr):
        """(R, BLOCK_K) band values, columns k = (segment (c, ry), xi): input row ry of channel c under
        the row's pooled output row, columns x0 + xi. Runs of XWP are contiguous in memory (vector loads);
        columns past W are zero (they would wrap into the next row, channel or member)."""
        j = k0 + tl.arange(0, BLOCK_K)
        seg, xi = j // XWP, j % XWP
        col = (seg // SP) * (H * W) + (seg % SP) * W + xi
        ok = rok[:, None] & ((x0[:, None] + xi[None, :]) < W) & (seg < C * SP)[None, :]
        return tl.load(x_ptr + base[:, None] + col[None, :], mask=ok, other=0.0)

    @triton.jit
    def _band_fwd_kernel(x_ptr, t_ptr, b_ptr, z_ptr, arg_ptr, M, XM, n_rows,
                         C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, O: tl.constexpr, Hq: tl.constexpr,
                         Wq: tl.constexpr, S: tl.constexpr, P: tl.constexpr, SP: tl.constexpr, XQ: tl.constexpr,
                         XWP: tl.constexpr, NXC: tl.constexpr, KB: tl.constexpr, BO: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr,
                         WINNERS: tl.constexpr):
        """z = maxpool_P(conv_S(x, w) + b) for a tile of rows (image, pooled row, column chunk) of member m:
        band (R, KB) @ t[m] (KB, N = P*P*XQ*BO), t holding w at every (pool position, pooled column)
        (a banded Toeplitz matrix), then the max over the P*P positions; with WINNERS, which position won
        goes to arg (int8, for the backward pass)."""
        m = tl.program_id(0)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        rok = r < n_rows
        base, x0, img, yq, xc = _band_rows(r, M, XM, m, C, H, W, Hq, S, P, XQ, NXC)
        N: tl.constexpr = P * P * XQ * BO
        n = tl.arange(0, N)
        acc = tl.zeros((BLOCK_R, N), tl.float32)
        for k0 in tl.static_range(0, KB, BLOCK_K):
            a = _band_tile(x_ptr, base, x0, rok, k0, C, H, W, SP, XWP, BLOCK_K)
            kk = k0 + tl.arange(0, BLOCK_K)
            t = tl.load(t_ptr + m * (KB * N) + kk[:, None] * N + n[None, :])  # (K_blk, N)
            acc += tl.dot(a.to(DOT_DTYPE), t.to(DOT_DTYPE), input_precision=PREC)
        # (R, P*P, XQ*BO): ties go to the first position in row-major order, as in torch's max_pool2d
        best, arg = tl.max(tl.reshape(acc, (BLOCK_R, P * P, XQ * BO)), axis=1, return_indices=True,
                           return_indices_tie_break_left=True)
        q = tl.arange(0, XQ * BO)
        xo, o = xc[:, None] * XQ + (q // BO)[None, :], q % BO  # (R, XQ*BO) pooled column; channel
        best += tl.load(b_ptr + m * O + o, mask=o < O, other=0.0)[None, :]
        out = img[:, None] * (O * Hq * Wq) + o[None, :] * (Hq * Wq) + yq[:, None] * Wq + xo  # (B, M, O, Hq, Wq)
        ok = rok[:, None] & (o < O)[None, :] & (xo < Wq)
        tl.store(z_ptr + out, best.to(z_ptr.dtype.element_ty), mask=ok)
        if WINNERS:
            tl.store(arg_ptr + out, arg.to(tl.int8), mask=ok)

    @triton.jit
    def _band_dt_kernel(x_ptr, gz_ptr, arg_ptr, dt_ptr, M, n_rows,
                        C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, O: tl.constexpr, Hq: tl.constexpr,
                        Wq: tl.constexpr, S: tl.constexpr, P: tl.constexpr, SP: tl.constexpr, XQ: tl.constexpr,
                        XWP: tl.constexpr, NXC: tl.constexpr, KB: tl.constexpr, BO: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
        """Gradient of the banded matrix t[m] over every n_split-th row block, K chunk kc:
        dt[k, (d, xq, o)] += sum over rows of band[row, k] * gz[row, xq, o] where pool position d won."""
        m, split, kc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_split = tl.num_programs(1)
        N: tl.constexpr = P * P * XQ * BO
        q = tl.arange(0, XQ * BO)
        d = tl.arange(0, P * P)
        acc = tl.zeros((BLOCK_K, N), tl.float32)
        for r0 in range(split * BLOCK_R, n_rows, n_split * BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rok = r < n_rows
            base, x0, img, yq, xc = _band_rows(r, M, M, m, C, H, W, Hq, S, P, XQ, NXC)
            xo, o = xc[:, None] * XQ + (q // BO)[None, :], q % BO
            out = img[:, None] * (O * Hq * Wq) + o[None, :] * (Hq * Wq) + yq[:, None] * Wq + xo
            ok = rok[:, None] & (o < O)[None, :] & (xo < Wq)
            g = tl.load(gz_ptr + out, mask=ok, other=0.0).to(tl.float32)  # (R, XQ*BO)
            if P > 1:  # route each pooled gradient to the position that won: (R, P*P, XQ*BO) -> (R, N)
                win = tl.load(arg_ptr + out, mask=ok, other=0).to(tl.int32)
                g = tl.reshape(tl.where(win[:, None, :] == d[None, :, None], g[:, None, :], 0.0), (BLOCK_R, N))
            a = _band_tile(x_ptr, base, x0, rok, kc * BLOCK_K, C, H, W, SP, XWP, BLOCK_K)
            acc += tl.dot(tl.trans(a.to(DOT_DTYPE)), g.to(DOT_DTYPE), input_precision=PREC)
        kk = kc * BLOCK_K + tl.arange(0, BLOCK_K)
        part = (split * M + m).to(tl.int64)
        tl.store(dt_ptr + part * (KB * N) + kk[:, None] * N + tl.arange(0, N)[None, :], acc, mask=(kk < KB)[:, None])


def _reference(x, w, b, stride, padding, pool):
    """The same function from stock PyTorch ops (grouped conv + max-pool): fallback and test oracle.
    x (B, 1, C, H, W) is every member's input: one dense conv with M*O output channels."""
    B, Mx, C, H, W = x.shape
    M = w.shape[0]
    y = F.conv2d(x.reshape(B, Mx * C, H, W), w.reshape(-1, *w.shape[2:]).to(x.dtype), b.reshape(-1).to(x.dtype),
                 stride=stride, padding=padding, groups=Mx)
    if pool > 1:
        y = F.max_pool2d(y, pool)
    return y.view(B, M, w.shape[1], *y.shape[-2:])


# ---- band kernels: the Toeplitz form of conv + pool ----

@dataclass(frozen=True)
class Band:
    """Tiling of one conv(+max-pool) layer for the band kernels. A row is (image, pooled output row, chunk
    of XQ pooled columns); its band is the SP input rows x XW input columns under it, per channel, stored
    as C*SP segments padded to XWP (a power of two) so each segment is one contiguous run in memory."""
    C: int
    H: int
    W: int
    O: int
    KS: int
    S: int
    P: int
    Hq: int
    Wq: int
    SP: int  # input rows under one pooled row: (P - 1) * S + KS
    XQ: int  # pooled columns per row chunk
    XWP: int  # input columns per segment: (XQ * P - 1) * S + KS, rounded up to a power of two
    NXC: int  # column chunks per pooled row
    BO: int  # output channels rounded up to a power of two
    KB: int  # band width C * SP * XWP, rounded up to a multiple of 16 (tensor-core K)

    @property
    def N(self) -> int:  # GEMM width: (pool position, pooled column, channel)
        return self.P * self.P * self.XQ * self.BO

    def kernel_args(self) -> tuple[int, ...]:
        return (self.C, self.H, self.W, self.O, self.Hq, self.Wq, self.S, self.P, self.SP, self.XQ, self.XWP,
                self.NXC, self.KB, self.BO)


_BAND_PLANS: dict[tuple, Band | None] = {}
_BAND_MAPS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # plain dicts: dynamo traces them


def band_plan(C: int, H: int, W: int, O: int, KS: int, S: int, P: int) -> Band | None:
    """The chunk width XQ with the fewest tensor-core MACs per pooled row (then the fewest chunks);
    None when no GEMM width N = P*P*XQ*BO fits in 16..256 (the caller falls back to PyTorch)."""
    key = (C, H, W, O, KS, S, P)
    if key not in _BAND_PLANS:
        _BAND_PLANS[key] = _plan(*key)
    return _BAND_PLANS[key]


def _plan(C: int, H: int, W: int, O: int, KS: int, S: int, P: int) -> Band | None:
    Hq, Wq = ((H - KS) // S + 1) // P, ((W - KS) // S + 1) // P
    SP, BO = (P - 1) * S + KS, pow2(O)
    best = None
    for XQ in (1, 2, 4, 8, 16):
        XWP, N, NXC = max(4, pow2((XQ * P - 1) * S + KS)), P * P * XQ * BO, -(-Wq // XQ)
        KB = -(-C * SP * XWP // 16) * 16
        if 16 <= N <= 256:
            cost = (NXC * KB * N, NXC)
            if best is None or cost < best[0]:
                best = cost, Band(C, H, W, O, KS, S, P, Hq, Wq, SP, XQ, XWP, NXC, BO, KB)
    return best and best[1]


def _band_maps(band: Band, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(valid, src) (KB, N): band-matrix entry (k = (c, ry, xi), n = (dy, dx, xq, o)) is
    w[o, c, ry - dy*S, xi - (xq*P + dx)*S] where valid; fold (O*C*KS*KS, P*P*XQ): the flat (KB*N)
    entries holding each weight, whose gradients sum to the weight's gradient."""
    # keyed by ints and the device, not by the Band: dynamo (torch 2.11) cannot guard on dataclass dict keys
    key = (band.C, band.H, band.W, band.O, band.KS, band.S, band.P, device)
    if key not in _BAND_MAPS:  # built once per layer geometry
        _BAND_MAPS[key] = _maps(band, device)
    return _BAND_MAPS[key]


def _maps(band: Band, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    C, KS, S, P, SP, XQ, XWP, BO = band.C, band.KS, band.S, band.P, band.SP, band.XQ, band.XWP, band.BO
    k, n = torch.arange(band.KB)[:, None], torch.arange(band.N)[None, :]
    seg, xi = k // XWP, k % XWP
    c, ry = seg // SP, seg % SP
    d, xq, o = n // (XQ * BO), (n // BO) % XQ, n % BO
    ky, kx = ry - (d // P) * S, xi - (xq * P + d % P) * S
    valid = (seg < C * SP) & (o < band.O) & (ky >= 0) & (ky < KS) & (kx >= 0) & (kx < KS)
    src = torch.where(valid, ((o * C + c) * KS + ky) * KS + kx, 0)
    wo, wc, wy, wx = torch.unravel_index(torch.arange(band.O * C * KS * KS), (band.O, C, KS, KS))
    pos = torch.arange(P * P * XQ)  # (d, xq)
    pd, pxq = pos // XQ, pos % XQ
    fk = (wc[:, None] * SP + wy[:, None] + (pd // P)[None, :] * S) * XWP + wx[:, None] + (pxq * P + pd % P)[None, :] * S
    fn = (pd[None, :] * XQ + pxq[None, :]) * BO + wo[:, None]
    return valid.to(device), src.to(device), (fk * band.N + fn).to(device)


def band_matrix(w: torch.Tensor, band: Band, dtype: torch.dtype) -> torch.Tensor:
    """w (M, O, C, k, k) -> (M, KB, N) banded Toeplitz matrix in `dtype` (one fused gather under compile)."""
    valid, src, _ = _band_maps(band, w.device)
    return _scatter_band(w.reshape(len(w), -1), valid, src, dtype)


def _scatter_band(w_flat: torch.Tensor, valid: torch.Tensor, src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w_flat (M, O*C*k*k) placed by the maps of `_band_maps` -> (M, KB, N) in `dtype`."""
    return torch.where(valid, w_flat.to(dtype)[:, src], 0.0)


def _band_of(x: torch.Tensor, O: int, KS: int, stride: int, pool: int) -> Band | None:
    return band_plan(x.shape[2], x.shape[3], x.shape[4], O, KS, stride, pool)


def _band_fwd(x, t, b, band: Band, winners: bool = True):
    """x (B, M or 1, C, H, W) pre-padded, t (M, KB, N) -> z (B, M, O, Hq, Wq) in x's dtype, arg int8 (empty
    without pool or `winners`). An x of one member is every member's input (evaluation: the images are read
    once into L2)."""
    B, M = x.shape[0], t.shape[0]
    z = torch.empty(B, M, band.O, band.Hq, band.Wq, device=x.device, dtype=x.dtype)
    winners = winners and band.P > 1
    arg = torch.empty(z.shape if winners else (0,), device=x.device, dtype=torch.int8)
    block_k = next(k for k in (64, 32, 16) if band.KB % k == 0)
    # members on grid axis 0 (members sharing input rows run together); axis 1 holds at most MAX_GRID_Y
    # row blocks, so large evaluation chunks go in several launches of whole images
    per_launch = max(1, MAX_GRID_Y * BAND_R // (band.Hq * band.NXC))
    with on_device(x.device):
        for a in range(0, B, per_launch):
            xs, zs, args = x[a: a + per_launch], z[a: a + per_launch], arg[a: a + per_launch] if winners else arg
            n_rows = len(xs) * band.Hq * band.NXC
            launch(_band_fwd_kernel, (M, triton.cdiv(n_rows, BAND_R)),
                xs, t, b, zs, args, M, x.shape[1], n_rows, *band.kernel_args(), BAND_R, block_k,
                *dot_dtype(x.dtype), winners, num_warps=NUM_WARPS, num_stages=stages(x.dtype))
    return z, arg


def _band_dt(gz, arg, x, band: Band) -> torch.Tensor:
    """Gradient of the band matrix: (M, KB, N) float32."""
    B, M = x.shape[:2]
    n_rows = B * band.Hq * band.NXC
    # one K chunk per program when it fits in registers (the routed gradient is then loaded once per row)
    block_k = next(k for k in (pow2(band.KB), 128, 64, 32, 16)
                   if k * band.N <= 8192 and (k >= band.KB or band.KB % k == 0))
    n_kc = triton.cdiv(band.KB, block_k)
    n_split = max(1, min(triton.cdiv(n_rows, BAND_R_DT), triton.cdiv(2048, M * n_kc)))  # fill the GPU
    dt = torch.empty(n_split, M, band.KB, band.N, device=x.device, dtype=torch.float32)
    with on_device(x.device):
        launch(_band_dt_kernel, (M, n_split, n_kc),
            x, gz, arg, dt, M, n_rows, *band.kernel_args(), BAND_R_DT, block_k, *dot_dtype(x.dtype),
            num_warps=NUM_WARPS, num_stages=stages(x.dtype))
    return dt[0] if n_split == 1 else dt.sum(0)


def _unpool_grid(gz, arg, pool: int, stride: int, KS: int, H: int, W: int) -> torch.Tensor:
    """The conv-output gradient (each pooled gradient at its winning position) spread on a zero grid with
    stride gaps and a KS-1 border: (B, M, O, H+KS-1, W+KS-1). Correlating it with the flipped kernel
    gives the input gradient."""
    B, M, O, Hq, Wq = gz.shape
    g = gz
    if pool > 1:  # (B, M, O, Hq, Wq) -> (B, M, O, Hq*P, Wq*P)
        hit = arg[..., None] == torch.arange(pool * pool, device=gz.device, dtype=torch.int8)
        g = (gz[..., None] * hit).view(B, M, O, Hq, Wq, pool, pool).permute(0, 1, 2, 3, 5, 4, 6)
        g = g.reshape(B, M, O, Hq * pool, Wq * pool)
    up = gz.new_zeros(B, M, O, H + KS - 1, W + KS - 1)
    a = KS - 1
    up[..., a: a + (g.shape[-2] - 1) * stride + 1: stride, a: a + (g.shape[-1] - 1) * stride + 1: stride] = g
    return up


# Custom ops: opaque to torch.compile (dynamo never traces into Triton), differentiable through autograd.
@torch.library.custom_op("weightzoo::band_conv_pool_raw", mutates_args=())
def _band_raw_op(x: torch.Tensor, t: torch.Tensor, b: torch.Tensor, O: int, KS: int, stride: int, pool: int
                 ) -> torch.Tensor:
    """Band-kernel conv + pool of pre-padded x with band matrix t, without autograd and without storing pool
    winners (the input gradient's conv; evaluation)."""
    return _band_fwd(x.contiguous(), t.contiguous(), b.contiguous(), _band_of(x, O, KS, stride, pool), False)[0]


def _band_fake(x, M, O, KS, stride, pool):
    band = _band_of(x, O, KS, stride, pool)
    z = x.new_empty(x.shape[0], M, band.O, band.Hq, band.Wq)
    return z, x.new_empty(z.shape if pool > 1 else (0,), dtype=torch.int8)


@_band_raw_op.register_fake
def _(x, t, b, O, KS, stride, pool):
    return _band_fake(x, t.shape[0], O, KS, stride, pool)[0]


@torch.library.custom_op("weightzoo::band_conv_pool", mutates_args=())
def _band_op(x: torch.Tensor, t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, fold: torch.Tensor,
             flip_valid: torch.Tensor, flip_src: torch.Tensor, stride: int, pool: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Band-kernel conv + pool of pre-padded x with band matrix t = band_matrix(w). w and the index maps
    (fold: t's gradient onto w; flip_*: the band matrix of the flipped kernel) are inputs only for the
    backward pass: it is traced under fake tensors, where global tensors may not appear."""
    return _band_fwd(x.contiguous(), t.contiguous(), b.contiguous(), _band_of(x, w.shape[1], w.shape[-1], stride, pool))


@_band_op.register_fake
def _(x, t, w, b, fold, flip_valid, flip_src, stride, pool):
    return _band_fake(x, w.shape[0], w.shape[1], w.shape[-1], stride, pool)


@torch.library.custom_op("weightzoo::band_conv_pool_dt", mutates_args=())
def _band_dt_op(gz: torch.Tensor, arg: torch.Tensor, x: torch.Tensor, O: int, KS: int, stride: int, pool: int
                ) -> torch.Tensor:
    return _band_dt(gz.contiguous(), arg, x.contiguous(), _band_of(x, O, KS, stride, pool))


@_band_dt_op.register_fake
def _(gz, arg, x, O, KS, stride, pool):
    band = _band_of(x, O, KS, stride, pool)
    return x.new_empty(x.shape[1], band.KB, band.N, dtype=torch.float32)


def _band_setup(ctx, inputs, output):
    x, _, w, _, fold, flip_valid, flip_src, stride, pool = inputs
    ctx.save_for_backward(x, w, output[1], fold, flip_valid, flip_src)
    ctx.geometry = (stride, pool)
    ctx.mark_non_differentiable(output[1])


def _band_backward(ctx, gz, _garg):
    """dw: the band-matrix gradient folded onto the weights (a gather-sum: deterministic); dx: the unpooled
    gradient correlated with the flipped kernel (a band conv without pool). The glue is traced: inductor fuses it."""
    x, w, arg, fold, flip_valid, flip_src = ctx.saved_tensors
    stride, pool = ctx.geometry
    M, O, C, KS = w.shape[0], w.shape[1], w.shape[2], w.shape[-1]
    dt = _band_dt_op(gz, arg, x, O, KS, stride, pool).reshape(M, -1)  # (M, KB*N)
    dw = dt[:, fold].sum(-1).view(w.shape)
    db = gz.float().sum((0, 3, 4))
    dx = None
    if ctx.needs_input_grad[0]:
        up = _unpool_grid(gz.to(x.dtype), arg, pool, stride, KS, x.shape[-2], x.shape[-1])
        w_t = w.flip(-1, -2).transpose(1, 2).reshape(M, -1)  # (M, C*O*k*k): the flipped kernel, C <-> O
        t_flip = _scatter_band(w_t, flip_valid, flip_src, x.dtype)
        dx = _band_raw_op(up, t_flip, w.new_zeros(M, C), C, KS, 1, 1)
    return dx, None, dw, db, None, None, None, None, None


_band_op.register_autograd(_band_backward, setup_context=_band_setup)


def runs_direct(device: torch.device, stride: int, pool: int = 1) -> bool:
    """Whether `conv_pool` runs this conv on the direct kernels (which can fuse the activation after it)."""
    return available(device) and pool == 1 and stride > 1  # strided windows: a band would be mostly zeros


def conv_pool(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: int = 1, padding: int = 0,
              pool: int = 1, act: torch.Tensor | None = None, dropout: Dropout | None = None) -> torch.Tensor:
    """x (B, M, C, H, W), w (M, O, C, k, k), b (M, O) -> (B, M, O, H', W') = maxpool(conv(x)) per member.
    Runs in x's dtype (bf16: tensor cores, fp32 accumulation; fp32: exact fp32 products).
    x (B, 1, C, H, W) is every member's input; that is forward-only (evaluation), else it is expanded.
    `act` (M,) activation codes (`_directconv.activation_codes`): each member's activation of the output, in the
    kernels; only where `runs_direct`, as is `dropout` (`_directconv.Dropout`), the engine's dropout after it."""
    M = w.shape[0]
    shared = x.shape[1] == 1 and M > 1
    if shared and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or b.requires_grad):
        x, shared = x.expand(-1, M, *x.shape[2:]), False  # the backward kernels want one input per member
    if runs_direct(x.device, stride, pool):
        return direct_conv(x, w, b, stride, padding, act, dropout)
    if act is not None or dropout is not None:
        raise ValueError(f"conv_pool: a fused activation or dropout needs the direct kernels (stride > 1, no pool, "
                         f"Triton); got stride {stride}, pool {pool} on {x.device}")
    if not available(x.device):
        return _reference(x, w, b, stride, padding, pool)
    x = x.contiguous()  # the band kernels read (B, M, C, H, W) rows (a direct conv may have written channels-last)
    xp = F.pad(x, (padding,) * 4) if padding else x  # the kernels see a pre-padded input
    O, C, KS = w.shape[1], w.shape[2], w.shape[-1]
    band = _band_of(xp, O, KS, stride, pool)
    flip = band_plan(O, xp.shape[-2] + KS - 1, xp.shape[-1] + KS - 1, C, KS, 1, 1)  # the input gradient's conv
    if band is None or flip is None:  # too many channels for one GEMM tile
        return _reference(x, w, b, stride, padding, pool)
    t = band_matrix(w.detach(), band, x.dtype)
    if shared:  # forward only: the backward's index maps are not needed
        return _band_raw_op(xp, t, b, O, KS, stride, pool)
    fold = _band_maps(band, x.device)[2]
    flip_valid, flip_src, _ = _band_maps(flip, x.device)
    return _band_op(xp, t, w, b, fold, flip_valid, flip_src, stride, pool)[0]
