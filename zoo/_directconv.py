"""Per-member convolution without pooling as implicit-GEMM Triton kernels: the strided 3x3 convs of cnn_gap /
smallcnn and vit_t's patch embedding, where the band form of `_convpool.py` spends most MACs and loads on
the zeros between strided windows.

`direct_conv(x, w, b, stride, padding)` is `conv2d(x_m, w_m, b_m)` for every member m. Activations are
`(B, M, C, H, W)`, weights `(M, O, C, k, k)` read in place (no band matrix). A GEMM row is one output pixel
(image, oy, ox) of member m and K is the patch under it, (c, ky, kx): the kernel gathers the patch from the
input (zero padding by masks, so no padded copy exists) and multiplies it by the member's (K, O) kernel
matrix on tensor cores. Backward:
- dw[m] (O, K) = sum over rows of gz (rows, O)^T @ patch (rows, K), and db[m] (O,) = the sum of those gz rows
  in the same kernel, partial sums over row splits added in a fixed order (deterministic). A channels-last input
  runs every tap in one program, two forms (`DW_FORMS`, `set_dw_form`): "taps", one (R, C) product a tap added
  into its slice of a (taps, C, O) accumulator, and "joint" (default), all taps side by side in one (R, 16 C)
  operand and one product. Compiled for sm_90a (`benchmarks/kernel_registers.py`), cnn_gap conv2's "taps"
  kernel holds 255 registers a thread and spills 312 bytes, the "joint" one 137 registers without spills but
  106 KiB of shared memory. On one H100 the joint form took a cnn_gap training step 11.47 -> 10.47 ms (378.9 ->
  415.1 model-epochs/s) and smallcnn's 8.7 -> 8.3 ms (benchmarks/NOTES.md). It runs where its operand is at most
  JOINT_COLUMNS wide (3x3 taps of 16 channels: the 16-channel layers), the taps form elsewhere;
- dx, three forms (`DX_FORMS`, chosen by `set_dx_form`; default "polyphase_joint"). "masked": a row is one input
  pixel, K is (o, ky, kx): the output gradient at (iy + pad - ky) / S where that is a whole output pixel (masked
  elsewhere: with stride 2 a quarter of the 3x3 taps hit), times w[m, o, c, ky, kx]. "polyphase": pixels are
  grouped by phase (iy % S, ix % S), and K is only the ceil(k / S)^2 taps per output channel that reach that
  phase (3x3 stride 2: 4 of 9), so the MACs and the gathers of the masked taps are not spent; one program per
  phase (on one H200 1.0x / 0.27x the masked form's time on smallcnn conv2 / conv3, 0.23x / 1.25x on cnn_gap's).
  "polyphase_joint": the same taps, one program writing all S^2 phases of its pixels, so every line of dx leaves
  whole (a cnn_gap training step 13.0 -> 11.4 ms, smallcnn 9.8 -> 8.7 ms on one H100; benchmarks/NOTES.md).
Layouts (`LAYOUTS`, chosen by `set_layout`): the outputs (z, dx) are stored (B, M, C, H, W) contiguous ("nchw") or
channels-last ("channels_last", the default: a pixel's C channels side by side, for C in `CL_CHANNELS`). Every
kernel reads either layout; a channels-last input is read one tap at a time, (rows, C) with one contiguous
C-vector per row (vector loads), where the contiguous layout gathers each element with its own address. On one
H200 the kernels of the 16-channel layers run 1.3-5x faster so, and a smallcnn / cnn_gap training step 1.8x /
1.6x faster than the contiguous layout's best (benchmarks/NOTES.md). The tensors keep their logical shape, so
the layers between the convs (activations, dropout, pooling, flatten) see no difference.
Epilogues: each member's activation (`ACTIVATION_CODES`) and after it the engine's hashed dropout (`Dropout`) run in
the forward kernel, their derivatives in the weight-gradient kernels (from the stored output; the mask redrawn
from its hash), so no elementwise pass over a map runs between the convs (smallcnn's random-zoo recipe 287.9 ->
387.7 model-epochs/s with the dropout fused, one H100; benchmarks/NOTES.md).
Without Triton the caller uses grouped conv (`_convpool._reference`); TRITON_INTERPRET=1 runs these on CPU.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._rng import kept_tl
from ._triton import MAX_GRID_Y, NUM_WARPS, checked_form, dot_dtype, launch, on_device, pow2, stages, tl, triton

BLOCK_R, BLOCK_R_DW = 128, 128  # GEMM rows per program (forward / input gradient, weight gradient)
DX_FORMS = ("masked", "polyphase", "polyphase_joint")
dx_form = "polyphase_joint"  # the input gradient's form (module docstring); `set_dx_form` changes it
# the weight gradient of a channels-last input: "taps", each tap's (R, C) tile multiplied alone and added into its
# slice of a (taps, C, O) accumulator; "joint", every tap's tile side by side in one (R, taps C) operand and one
# product (a 256-row accumulator on tensor cores, no per-tap select over the accumulator; `set_dw_form`)
DW_FORMS = ("taps", "joint")
dw_form = "joint"
BLOCK_R_DW_JOINT = 64  # rows a step of the joint form: its (R, 16 C) bf16 operand is 32 KiB a pipeline stage at 64
JOINT_COLUMNS = 256  # widest joint operand (taps rounded to a power of two, x channels): 3x3 taps of 16 channels;
# wider layers run the taps form (a 5x5 or a 32-channel layer's operand would not fit shared memory)
LAYOUTS = ("nchw", "channels_last")
layout = "channels_last"  # how the kernels store what they write (module docstring); `set_layout` changes it
CL_CHANNELS = (16, 32, 64)  # channel counts a channels-last tensor may have: one tile width of the tap GEMMs
# activations the forward kernel applies in its epilogue, by code; each one's derivative follows from its output
# (relu / leaky relu: y > 0, tanh: 1 - y^2, sigmoid: y (1 - y)), which the weight-gradient kernel applies to
# the output gradient it reads, so neither the pre-activation nor inductor's passes over it exist
ACTIVATION_CODES = {"identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3, "leaky_relu": 4}
fuse_activation = True  # `set_activation_fusion` changes it
# the engine's dropout after a fused activation, in the same kernels: the forward writes the dropped output (the
# mask hashed in its epilogue), and the weight-gradient kernel redraws the mask, scales the output gradient and
# recovers y = output * keep for the activation's derivative where kept, so the elementwise passes over each map
# (and their float32 copies) do not exist (`set_dropout_fusion`)
fuse_dropout = True


class Dropout(NamedTuple):
    """One layer of the engine's hashed dropout (`zoo.engine._dropout`) for the kernels: the members' keys (M,)
    int64, thresholds ceil(rate 2^32) (M,) int64 (an element is kept where its hash reaches it) and keep
    probabilities 1 - rate (M,) float32."""
    key: torch.Tensor
    thr: torch.Tensor
    keep: torch.Tensor


def set_dx_form(name: str) -> None:
    """Choose the input-gradient kernel for the direct convs run from now on (populations built after)."""
    global dx_form
    dx_form = checked_form("direct-conv dx form", name, DX_FORMS)


def set_dw_form(name: str) -> None:
    """Choose the channels-last weight-gradient kernel for the direct convs run from now on."""
    global dw_form
    dw_form = checked_form("direct-conv dw form", name, DW_FORMS)


def set_layout(name: str) -> None:
    """Choose how the direct convs store their outputs (forward z, input gradient dx) from now on."""
    global layout
    layout = checked_form("direct-conv layout", name, LAYOUTS)


def set_activation_fusion(on: bool) -> None:
    """Whether the engine runs a direct conv's activation in its kernels (forward epilogue, derivative in dw) from
    now on, or as its own elementwise layer."""
    global fuse_activation
    fuse_activation = bool(on)


def set_dropout_fusion(on: bool) -> None:
    """Whether the engine runs the dropout after a fused activation in the same kernels from now on, or as its own
    elementwise layer."""
    global fuse_dropout
    fuse_dropout = bool(on)


def activation_codes(names, device: torch.device | str, table: dict[str, int] = ACTIVATION_CODES
                     ) -> torch.Tensor | None:
    """(M,) int32 codes of the members' activations in `table`, or None when one has no fused form there."""
    if any(n not in table for n in names):
        return None
    return torch.tensor([table[n] for n in names], dtype=torch.int32, device=device)


def _alloc(like: torch.Tensor, B: int, M: int, C: int, H: int, W: int, cl: bool) -> torch.Tensor:
    """An uninitialised (B, M, C, H, W) output, channels-last (strides (M H W C, H W C, 1, W C, C)) where `cl`
    and C is in CL_CHANNELS. The fake (meta) functions call this too, so compile sees the real strides; `cl` is
    an argument of the ops (not the module's `layout`), so graphs traced under each layout differ."""
    if cl and C in CL_CHANNELS:
        return like.new_empty(B, M, H, W, C).permute(0, 1, 4, 2, 3)
    return like.new_empty(B, M, C, H, W)


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether a (B, M, C, H, W) tensor is stored channels-last and not also contiguous."""
    return t.dim() == 5 and not t.is_contiguous() and t.permute(0, 1, 3, 4, 2).is_contiguous()


def _readable(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(t, channels_last) as the kernels read it: as stored where it is contiguous or channels-last with a
    tile-width channel count, else a contiguous copy."""
    if t.is_contiguous():
        return t, False
    if t.shape[2] in CL_CHANNELS and is_channels_last(t):
        return t, True
    return t.contiguous(), False


def out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def block_k(K: int) -> int:
    """K chunk: the power of two in 16..64 that pads K least (ties: the larger)."""
    return min((-(-K // k) * k, -k, k) for k in (64, 32, 16))[2]


if triton is not None:
    @triton.jit
    def _patch(x_ptr, xbase, oy, ox, rok, k0, C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
               KS: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr):
        """(R, BLOCK_K) patch values k = (c, ky, kx) under output pixels (oy, ox); zero outside the image."""
        k = k0 + tl.arange(0, BLOCK_K)
        c, ky, kx = k // (KS * KS), (k // KS) % KS, k % KS
        iy = oy[:, None] * S + ky[None, :] - PAD
        ix = ox[:, None] * S + kx[None, :] - PAD
        ok = rok[:, None] & (k < K)[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        return tl.load(x_ptr + xbase[:, None] + c[None, :] * (H * W) + iy * W + ix, mask=ok, other=0.0)

    @triton.jit
    def _tap(x_ptr, xbase, oy, ox, rok, t, C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
             KS: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr):
        """(R, C) channels-last input under tap t = (ky, kx) of output pixels (oy, ox): one contiguous
        C-vector per row (vector loads), zero outside the image."""
        iy, ix = oy * S + t // KS - PAD, ox * S + t % KS - PAD
        ok = rok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        c = tl.arange(0, C)
        return tl.load(x_ptr + (xbase + (iy * W + ix) * C)[:, None] + c[None, :], mask=ok[:, None], other=0.0)

    @triton.jit
    def _offsets(unit, pix, ch, CH: tl.constexpr, HW: tl.constexpr, CL: tl.constexpr):
        """Element offsets of (row, channel) in (B, M, CH, H, W): unit = image * M + member, pix = y * W + x;
        channels-last puts a pixel's CH channels side by side."""
        if CL:
            return (unit * HW + pix)[:, None] * CH + ch[None, :]
        return unit[:, None] * (CH * HW) + ch[None, :] * HW + pix[:, None]

    @triton.jit
    def _row_mask(rok, ch, CH: tl.constexpr):
        """(R, tile width): rows in range and channels < CH (ch < CH is constant over CH-aligned runs, which the
        compiler sees, so it does not break vector stores)."""
        return rok[:, None] & (ch < CH)[None, :]

    @triton.jit
    def _act(z, code):
        """A member's activation (ACTIVATION_CODES) of fp32 pre-activations z; tanh(z) = 2 sigmoid(2 z) - 1."""
        s = tl.sigmoid(z * tl.where(code == 2, 2.0, 1.0))
        y = tl.where(code == 1, tl.maximum(z, 0.0), z)
        y = tl.where(code == 2, 2.0 * s - 1.0, y)
        y = tl.where(code == 3, s, y)
        return tl.where((code == 4) & (z < 0), z * 0.01, y)  # F.leaky_relu's default slope (the registry's)

    @triton.jit
    def _act_grad(g, y, code):
        """The gradient at the pre-activation, from the gradient g at the activation's output y (fp32)."""
        d = tl.where(code == 2, 1.0 - y * y, 1.0)
        d = tl.where(code == 3, y * (1.0 - y), d)
        d = tl.where((code == 1) & (y <= 0), 0.0, d)
        return g * tl.where((code == 4) & (y <= 0), 0.01, d)

    @triton.jit
    def _rows(r0, n_rows, M, m, HW: tl.constexpr, BLOCK: tl.constexpr):
        """(in range, unit = image * M + m, pixel) of the BLOCK GEMM rows (image, output pixel) from r0."""
        r = r0 + tl.arange(0, BLOCK)
        return r < n_rows, (r // HW).to(tl.int64) * M + m, r % HW

    @triton.jit
    def _member(act_ptr, key_ptr, thr_ptr, keep_ptr, m, ACT: tl.constexpr, DROP: tl.constexpr):
        """Member m's (activation code, dropout key, threshold, keep probability); placeholders where off."""
        code, key, thr, keep = 0, 0, 0, 1.0
        if ACT:
            code = tl.load(act_ptr + m)
        if DROP:
            key, thr, keep = tl.load(key_ptr + m), tl.load(thr_ptr + m), tl.load(keep_ptr + m)
        return code, key, thr, keep

    @triton.jit
    def _dropped(v, key, thr, keep, image, pix, o, O: tl.constexpr, HW: tl.constexpr):
        """(R, BO) v / keep where the engine's dropout keeps element (image, o, pix) of a member's (B, O, Ho, Wo)
        output (`zoo.engine._dropout`'s indices), else 0."""
        elem = (image.to(tl.int64) * (O * HW) + pix)[:, None] + o[None, :] * HW
        return tl.where(kept_tl(key, thr, elem), v / keep, 0.0)

    @triton.jit
    def _out_grad(gz_ptr, y_ptr, gzo_ptr, unit, pix, rok, o, code, key, thr, keep, M, write, O: tl.constexpr,
                  HW: tl.constexpr, GCL: tl.constexpr, ACT: tl.constexpr, YCL: tl.constexpr, WRITE_GZ: tl.constexpr,
                  DROP: tl.constexpr):
        """(R, BO) fp32 gradient at the conv's output z of rows (unit, pix): gz as read, or with ACT the gradient at
        y = act(z) times the activation's derivative from y, then written to gzo (y's layout) where WRITE_GZ and
        `write` (one program of those that read the rows). With DROP (and ACT) the output was drop(y) = y / keep
        where kept: gz is the gradient there, so kept rows take gz / keep and y = output * keep, the rest 0."""
        g = tl.load(gz_ptr + _offsets(unit, pix, o, O, HW, GCL), mask=_row_mask(rok, o, O), other=0.0)
        g = g.to(tl.float32)
        if DROP:
            g = _dropped(g, key, thr, keep, unit // M, pix, o, O, HW)
        if ACT:
            yo = _offsets(unit, pix, o, O, HW, YCL)
            y = tl.load(y_ptr + yo, mask=_row_mask(rok, o, O), other=0.0).to(tl.float32)
            g = _act_grad(g, y * keep if DROP else y, code)
            if WRITE_GZ:
                if write:
                    tl.store(gzo_ptr + yo, g.to(gzo_ptr.dtype.element_ty), mask=_row_mask(rok, o, O))
        return g

    @triton.jit
    def _fwd_kernel(x_ptr, w_ptr, b_ptr, act_ptr, key_ptr, thr_ptr, keep_ptr, z_ptr, M, XM, n_rows, img0,
                    C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, O: tl.constexpr, Ho: tl.constexpr,
                    Wo: tl.constexpr, KS: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr, K: tl.constexpr,
                    BO: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    PREC: tl.constexpr, XCL: tl.constexpr, ZCL: tl.constexpr, ACT: tl.constexpr, DROP: tl.constexpr):
        """z = conv_S(x, w[m]) + b[m] for a tile of output pixels of member m: patch (R, K) @ w[m]^T (K, O),
        or with ACT its activation act[m](z) (z itself is not stored), and with DROP the engine's dropout of that
        (rounded to z's dtype first, as the activation layer's output would be). The input has XM = M members, or XM = 1
        when every member reads the same images (evaluation). XCL / ZCL: x / z channels-last; a channels-last
        x is read one tap (R, C) at a time."""
        m = tl.program_id(0)
        r = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        rok = r < n_rows
        image, pix = (r // (Ho * Wo)).to(tl.int64), r % (Ho * Wo)
        oy, ox = pix // Wo, pix % Wo
        xbase = (image * XM + m % XM) * (C * H * W)
        o = tl.arange(0, BO)
        acc = tl.zeros((BLOCK, BO), tl.float32)
        if XCL:  # K = (ky, kx, c): C-wide steps, w[m, o, c, ky, kx] at o K + c k^2 + t
            c = tl.arange(0, C)
            for t in tl.static_range(KS * KS):
                a = _tap(x_ptr, xbase, oy, ox, rok, t, C, H, W, KS, S, PAD)
                wt = tl.load(w_ptr + m * (O * K) + o[None, :] * K + c[:, None] * (KS * KS) + t,
                             mask=(o < O)[None, :], other=0.0)  # (C, BO)
                acc += tl.dot(a.to(DOT_DTYPE), wt.to(DOT_DTYPE), input_precision=PREC)
        else:  # K = (c, ky, kx) in BLOCK_K chunks
            for k0 in tl.static_range(0, K, BLOCK_K):
                a = _patch(x_ptr, xbase, oy, ox, rok, k0, C, H, W, KS, S, PAD, K, BLOCK_K)
                k = k0 + tl.arange(0, BLOCK_K)
                wt = tl.load(w_ptr + m * (O * K) + o[None, :] * K + k[:, None],
                             mask=(k < K)[:, None] & (o < O)[None, :], other=0.0)  # (BLOCK_K, BO)
                acc += tl.dot(a.to(DOT_DTYPE), wt.to(DOT_DTYPE), input_precision=PREC)
        acc += tl.load(b_ptr + m * O + o, mask=o < O, other=0.0)[None, :]
        code, key, thr, keep = _member(act_ptr, key_ptr, thr_ptr, keep_ptr, m, ACT, DROP)
        if ACT:
            acc = _act(acc, code)
        if DROP:
            acc = _dropped(acc.to(z_ptr.dtype.element_ty).to(tl.float32), key, thr, keep, img0 + image, pix, o, O,
                           Ho * Wo)  # img0: this launch's first image in the batch
        out = _offsets(image * M + m, pix, o, O, Ho * Wo, ZCL)  # (B, M, O, Ho, Wo)
        tl.store(z_ptr + out, acc.to(z_ptr.dtype.element_ty), mask=_row_mask(rok, o, O))

    @triton.jit
    def _dw_kernel(x_ptr, gz_ptr, y_ptr, act_ptr, key_ptr, thr_ptr, keep_ptr, gzo_ptr, dw_ptr, db_ptr, M, n_rows,
                   C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, O: tl.constexpr, Ho: tl.constexpr,
                   Wo: tl.constexpr, KS: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr, K: tl.constexpr,
                   BO: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   PREC: tl.constexpr, GCL: tl.constexpr, ACT: tl.constexpr, YCL: tl.constexpr,
                   WRITE_GZ: tl.constexpr, DROP: tl.constexpr):
        """Partial weight gradient of member m over every n_split-th row block, K chunk kc, for a contiguous x
        (a channels-last one runs `_dw_taps_kernel`):
        dw[split, m, o, k] = sum over rows of gz[row, o] * patch[row, k]. K chunks on grid axis 0, so a
        member's chunks run together and re-read its output gradient from L2. Chunk 0 also sums the rows of
        gz it reads: the bias gradient's partial db[split, m, o] (so no separate reduction over gz runs).
        With ACT the conv's output was y = act[m](z) and gz_ptr holds the gradient at y: each chunk turns it
        into the gradient at z with y (stored channels-last where YCL), and chunk 0 writes that to gzo (y's
        layout) for the input gradient where WRITE_GZ. GCL: gz stored channels-last."""
        kc, m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_split = tl.num_programs(2)
        o = tl.arange(0, BO)
        code, key, thr, keep = _member(act_ptr, key_ptr, thr_ptr, keep_ptr, m, ACT, DROP)
        acc = tl.zeros((BLOCK_K, BO), tl.float32)
        # gz summed elementwise over row blocks and reduced across threads once at the end (a reduction per
        # row block made the kernel ~1.5x slower on an H200, benchmarks/NOTES.md)
        gsum = tl.zeros((BLOCK, BO), tl.float32)
        for r0 in range(split * BLOCK, n_rows, n_split * BLOCK):
            rok, unit, pix = _rows(r0, n_rows, M, m, Ho * Wo, BLOCK)
            g = _out_grad(gz_ptr, y_ptr, gzo_ptr, unit, pix, rok, o, code, key, thr, keep, M, kc == 0, O,
                          Ho * Wo, GCL, ACT, YCL, WRITE_GZ, DROP)  # (R, BO)
            a = _patch(x_ptr, unit * (C * H * W), pix // Wo, pix % Wo, rok, kc * BLOCK_K, C, H, W, KS, S, PAD, K,
                       BLOCK_K)
            acc += tl.dot(tl.trans(a.to(DOT_DTYPE)), g.to(DOT_DTYPE), input_precision=PREC)
            gsum += g
        part = (split * M + m).to(tl.int64) * O
        k = kc * BLOCK_K + tl.arange(0, BLOCK_K)
        tl.store(dw_ptr + (part + o[None, :]) * K + k[:, None], acc, mask=(k < K)[:, None] & (o < O)[None, :])
        if kc == 0:
            tl.store(db_ptr + part + o, tl.sum(gsum, axis=0), mask=o < O)

    @triton.jit
    def _dw_taps_kernel(x_ptr, gz_ptr, y_ptr, act_ptr, key_ptr, thr_ptr, keep_ptr, gzo_ptr, dw_ptr, db_ptr, M, n_rows,
                        C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, O: tl.constexpr, Ho: tl.constexpr,
                        Wo: tl.constexpr, KS: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr, K: tl.constexpr,
                        BO: tl.constexpr, BLOCK: tl.constexpr, TP: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        PREC: tl.constexpr, GCL: tl.constexpr, ACT: tl.constexpr, YCL: tl.constexpr,
                        WRITE_GZ: tl.constexpr, DROP: tl.constexpr):
        """`_dw_kernel` for a channels-last x with every tap in one program: each row block's gz (and with ACT y,
        the activation's derivative and the gz write) is read once and multiplied by the KS^2 taps' (R, C) input
        tiles, where one program per tap read gz (and y) KS^2 times. dw for tap t accumulates in acc[t] of a
        (TP, C, BO) tile (TP: KS^2 rounded up to a power of two)."""
        m, split = tl.program_id(0), tl.program_id(1)
        n_split = tl.num_programs(1)
        o, c, taps = tl.arange(0, BO), tl.arange(0, C), tl.arange(0, TP)
        code, key, thr, keep = _member(act_ptr, key_ptr, thr_ptr, keep_ptr, m, ACT, DROP)
        acc = tl.zeros((TP, C, BO), tl.float32)
        gsum = tl.zeros((BLOCK, BO), tl.float32)
        for r0 in range(split * BLOCK, n_rows, n_split * BLOCK):
            rok, unit, pix = _rows(r0, n_rows, M, m, Ho * Wo, BLOCK)
            g = _out_grad(gz_ptr, y_ptr, gzo_ptr, unit, pix, rok, o, code, key, thr, keep, M, True, O,
                          Ho * Wo, GCL, ACT, YCL, WRITE_GZ, DROP)  # (R, BO)
            gd = g.to(DOT_DTYPE)
            for t in tl.static_range(KS * KS):
                a = _tap(x_ptr, unit * (C * H * W), pix // Wo, pix % Wo, rok, t, C, H, W, KS, S, PAD)
                d = tl.dot(tl.trans(a.to(DOT_DTYPE)), gd, input_precision=PREC)  # (C, BO)
                acc = tl.where((taps == t)[:, None, None], acc + d[None, :, :], acc)
            gsum += g
        part = (split * M + m).to(tl.int64) * O
        # dw[part, o, c, ky, kx] at (part + o) K + c KS^2 + t
        out = (part + o[None, None, :]) * K + c[None, :, None] * (KS * KS) + taps[:, None, None]
        tl.store(dw_ptr + out, acc, mask=(taps < KS * KS)[:, None, None] & (o < O)[None, None, :])
        tl.store(db_ptr + part + o, tl.sum(gsum, axis=0), mask=o < O)

    @triton.jit
    def _dw_joint_kernel(x_ptr, gz_ptr, y_ptr, act_ptr, key_ptr, thr_ptr, keep_ptr, gzo_ptr, dw_ptr, db_ptr, M,
                         n_rows, C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, O: tl.constexpr, Ho: tl.constexpr,
                         Wo: tl.constexpr, KS: tl.constexpr, S: tl.constexpr, PAD: tl.constexpr, K: tl.constexpr,
                         BO: tl.constexpr, BLOCK: tl.constexpr, TP: tl.constexpr, DOT_DTYPE: tl.constexpr,
                         PREC: tl.constexpr, GCL: tl.constexpr, ACT: tl.constexpr, YCL: tl.constexpr,
                         WRITE_GZ: tl.constexpr, DROP: tl.constexpr):
        """`_dw_taps_kernel` with every tap's (R, C) input tile side by side in one (R, TP C) operand, column
        j = t C + c (taps past KS^2 masked to zero), and one (TP C, BO) product a row block: no per-tap select
        over a (TP, C, BO) accumulator."""
        m, split = tl.program_id(0), tl.program_id(1)
        n_split = tl.num_programs(1)
        o, j = tl.arange(0, BO), tl.arange(0, TP * C)
        t, c = j // C, j % C
        code, key, thr, keep = _member(act_ptr, key_ptr, thr_ptr, keep_ptr, m, ACT, DROP)
        acc = tl.zeros((TP * C, BO), tl.float32)
        gsum = tl.zeros((BLOCK, BO), tl.float32)
        for r0 in range(split * BLOCK, n_rows, n_split * BLOCK):
            rok, unit, pix = _rows(r0, n_rows, M, m, Ho * Wo, BLOCK)
            g = _out_grad(gz_ptr, y_ptr, gzo_ptr, unit, pix, rok, o, code, key, thr, keep, M, True, O,
                          Ho * Wo, GCL, ACT, YCL, WRITE_GZ, DROP)  # (R, BO)
            iy = (pix // Wo)[:, None] * S + (t // KS)[None, :] - PAD  # (R, TP C)
            ix = (pix % Wo)[:, None] * S + (t % KS)[None, :] - PAD
            ok = rok[:, None] & (t < KS * KS)[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            a = tl.load(x_ptr + (unit * (C * H * W))[:, None] + (iy * W + ix) * C + c[None, :], mask=ok, other=0.0)
            acc += tl.dot(tl.trans(a.to(DOT_DTYPE)), g.to(DOT_DTYPE), input_precision=PREC)  # (TP C, BO)
            gsum += g
        part = (split * M + m).to(tl.int64) * O
        # dw[part, o, c, ky, kx] at (part + o) K + c KS^2 + t
        out = (part + o[None, :]) * K + (c * (KS * KS) + t)[:, None]
        tl.store(dw_ptr + out, acc, mask=(t < KS * KS)[:, None] & (o < O)[None, :])
        tl.store(db_ptr + part + o, tl.sum(gsum, axis=0), mask=o < O)

    @triton.jit
    def _dx_kernel(gz_ptr, w_ptr, dx_ptr, M, n_rows, C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                   O: tl.constexpr, Ho: tl.constexpr, Wo: tl.constexpr, KS: tl.constexpr, S: tl.constexpr,
                   PAD: tl.constexpr, BC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, PREC: tl.constexpr):
        """dx for a tile of input pixels (iy, ix) of member m: K = (o, ky, kx), the output gradient at
        ((iy + PAD - ky) / S, (ix + PAD - kx) / S) where both are whole and inside, times w[m, o, c, ky, kx]."""
        KO: tl.constexpr = O * KS * KS
        m = tl.program_id(0)
        r = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        rok = r < n_rows
        image, pix = (r // (H * W)).to(tl.int64), r % (H * W)
        iy, ix = pix // W, pix % W
        gbase = (image * M + m) * (O * Ho * Wo)
        c = tl.arange(0, BC)
        acc = tl.zeros((BLOCK, BC), tl.float32)
        for k0 in tl.static_range(0, KO, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            o, ky, kx = k // (KS * KS), (k // KS) % KS, k % KS
            ty, tx = iy[:, None] + PAD - ky[None, :], ix[:, None] + PAD - kx[None, :]  # (R, BLOCK_K)
            oy, ox = ty // S, tx // S
            ok = (rok[:, None] & (k < KO)[None, :] & (ty >= 0) & (tx >= 0) & (ty % S == 0) & (tx % S == 0)
                  & (oy < Ho) & (ox < Wo))
            g = tl.load(gz_ptr + gbase[:, None] + o[None, :] * (Ho * Wo) + oy * Wo + ox, mask=ok, other=0.0)
            wt = tl.load(w_ptr + m * (O * C * KS * KS) + (o * (C * KS * KS) + ky * KS + kx)[:, None]
                         + c[None, :] * (KS * KS), mask=(k < KO)[:, None] & (c < C)[None, :], other=0.0)
            acc += tl.dot(g.to(DOT_DTYPE), wt.to(DOT_DTYPE), input_precision=PREC)
        out = (image * M + m)[:, None] * (C * H * W) + c[None, :] * (H * W) + pix[:, None]
        tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty), mask=rok[:, None] & (c < C)[None, :])

    @triton.jit
    def _dx_phase(gz_ptr, wbase, dx_ptr, unit, qy, qx, r_ok, phase, C: tl.constexpr, H: tl.constexpr,
                  W: tl.constexpr, O: tl.constexpr, Ho: tl.constexpr, Wo: tl.constexpr, KS: tl.constexpr,
                  S: tl.constexpr, PAD: tl.constexpr, BC: tl.constexpr, BLOCK: tl.constexpr,
                  BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, GCL: tl.constexpr,
                  XCL: tl.constexpr):
        """dx at the input pixels (py + S qy, px + S qx) of phase (py, px) = (iy % S, ix % S) of rows (unit, qy,
        qx). Only the taps ky = (py + PAD) % S + S * jy (and likewise kx) reach a pixel of that phase, so K =
        (o, jy, jx) holds O * ceil(KS / S)^2 taps, not O * KS^2 (3x3 stride 2: 4 of 9). The tap (jy, jx) reads
        the output gradient at (qy + (py + PAD) // S - jy, qx + (px + PAD) // S - jx), times
        w[m, o, c, ky, kx]. GCL / XCL: gz / dx channels-last; a channels-last gz is read one tap (R, O) at a
        time."""
        TJ: tl.constexpr = (KS + S - 1) // S
        KO: tl.constexpr = O * TJ * TJ
        py, px = phase // S, phase % S
        iy, ix = py + S * qy, px + S * qx
        rok = r_ok & (iy < H) & (ix < W)
        c = tl.arange(0, BC)
        acc = tl.zeros((BLOCK, BC), tl.float32)
        if GCL:  # one tap (jy, jx) per step, its O channels contiguous
            o = tl.arange(0, O)
            for t in tl.static_range(TJ * TJ):
                ky, kx = (py + PAD) % S + S * (t // TJ), (px + PAD) % S + S * (t % TJ)
                oy, ox = qy + (py + PAD) // S - t // TJ, qx + (px + PAD) // S - t % TJ  # (R,)
                # phases with fewer taps mask the rest: their rows of gz load as zeros, and the tap index is
                # clamped so the weight load stays inside w (the tap test is on (R,) vectors: the interpreter
                # turns a scalar int1 broadcast into int32)
                ok = rok & (qy * 0 + ky < KS) & (qx * 0 + kx < KS) & (oy >= 0) & (oy < Ho) & (ox >= 0) & (ox < Wo)
                g = tl.load(gz_ptr + ((unit * (Ho * Wo) + oy * Wo + ox) * O)[:, None] + o[None, :],
                            mask=ok[:, None], other=0.0)  # (R, O)
                tap = tl.minimum(ky, KS - 1) * KS + tl.minimum(kx, KS - 1)
                wt = tl.load(wbase + o[:, None] * (C * KS * KS) + c[None, :] * (KS * KS) + tap,
                             mask=(c < C)[None, :], other=0.0)  # (O, BC)
                acc += tl.dot(g.to(DOT_DTYPE), wt.to(DOT_DTYPE), input_precision=PREC)
        else:
            gbase = unit * (O * Ho * Wo)
            for k0 in tl.static_range(0, KO, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                o, jy, jx = k // (TJ * TJ), (k // TJ) % TJ, k % TJ
                ky, kx = (py + PAD) % S + S * jy, (px + PAD) % S + S * jx
                kok = (k < KO) & (ky < KS) & (kx < KS)  # (BLOCK_K,): phases with fewer taps mask the rest
                oy = qy[:, None] + (py + PAD) // S - jy[None, :]  # (R, BLOCK_K)
                ox = qx[:, None] + (px + PAD) // S - jx[None, :]
                ok = rok[:, None] & kok[None, :] & (oy >= 0) & (oy < Ho) & (ox >= 0) & (ox < Wo)
                g = tl.load(gz_ptr + gbase[:, None] + o[None, :] * (Ho * Wo) + oy * Wo + ox, mask=ok, other=0.0)
                wt = tl.load(wbase + (o * (C * KS * KS) + ky * KS + kx)[:, None] + c[None, :] * (KS * KS),
                             mask=kok[:, None] & (c < C)[None, :], other=0.0)
                acc += tl.dot(g.to(DOT_DTYPE), wt.to(DOT_DTYPE), input_precision=PREC)
        out = _offsets(unit, iy * W + ix, c, C, H * W, XCL)
        tl.store(dx_ptr + out, acc.to(dx_ptr.dtype.element_ty), mask=_row_mask(rok, c, C))

    @triton.jit
    def _dx_phase_kernel(gz_ptr, w_ptr, dx_ptr, M, n_rows, C: tl.constexpr, H: tl.constexpr,
                         W: tl.constexpr, O: tl.constexpr, Ho: tl.constexpr, Wo: tl.constexpr, KS: tl.constexpr,
                         S: tl.constexpr, PAD: tl.constexpr, BC: tl.constexpr, BLOCK: tl.constexpr,
                         BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PREC: tl.constexpr, GCL: tl.constexpr,
                         XCL: tl.constexpr, NP: tl.constexpr):
        """dx for a tile of rows (image, qy, qx) of member m, in NP of the S^2 phases (`_dx_phase`), one after
        another. Grid axis 1 is (row block, phase group), group fastest. NP = S^2 ("polyphase_joint"): one
        program writes every phase of its pixels, so each line of dx leaves whole, and the phases read the same
        output-gradient neighbourhood from L1. NP = 1 ("polyphase"): the phases of a block run one member-wide
        wave apart (~17 MB of writes for cnn_gap conv2), and every line of a channels-last dx (4 pixels of 16
        bf16 channels: 2 phases) is written in pieces that must meet in L2. Rows past the image are masked."""
        HQ: tl.constexpr = (H + S - 1) // S
        WQ: tl.constexpr = (W + S - 1) // S
        NG: tl.constexpr = S * S // NP
        m, group, blk = tl.program_id(0), tl.program_id(1) % NG, tl.program_id(1) // NG
        r = blk * BLOCK + tl.arange(0, BLOCK)
        image, q = (r // (HQ * WQ)).to(tl.int64), r % (HQ * WQ)
        wbase = w_ptr + m * (O * C * KS * KS)
        for i in tl.static_range(NP):
            _dx_phase(gz_ptr, wbase, dx_ptr, image * M + m, q // WQ, q % WQ, r < n_rows, group * NP + i, C, H, W,
                      O, Ho, Wo, KS, S, PAD, BC, BLOCK, BLOCK_K, DOT_DTYPE, PREC, GCL, XCL)


def _geometry(x_shape, w_shape, stride: int, padding: int) -> tuple[int, ...]:
    """(C, H, W, O, Ho, Wo, KS, S, PAD): the kernels' shape arguments."""
    C, H, W = x_shape[-3:]
    O, KS = w_shape[1], w_shape[-1]
    return C, H, W, O, out_size(H, KS, stride, padding), out_size(W, KS, stride, padding), KS, stride, padding


def _fwd(x, w, b, stride: int, padding: int, cl: bool = False, act: torch.Tensor | None = None,
         drop: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """x (B, M or 1, C, H, W), w (M, O, C, k, k), b (M, O) -> z (B, M, O, Ho, Wo) in x's dtype, stored as
    `_alloc` says; act[m](z) where `act` (M,) holds activation codes, and its dropout where `drop` holds the
    members' (key, threshold, keep) (M,) each. Grid axis 1 holds at most MAX_GRID_Y row blocks, so large
    evaluation chunks go in several launches of whole images."""
    x, xcl = _readable(x)
    g = _geometry(x.shape, w.shape, stride, padding)
    C, O, Ho, Wo, KS = g[0], g[3], g[4], g[5], g[6]
    B, M, K = x.shape[0], w.shape[0], C * KS * KS
    z = _alloc(x, B, M, O, Ho, Wo, cl)
    zcl = not z.is_contiguous()
    per_launch = max(1, MAX_GRID_Y * BLOCK_R // (Ho * Wo))
    with on_device(x.device):
        for a in range(0, B, per_launch):
            xs, zs = x[a: a + per_launch], z[a: a + per_launch]
            n_rows = len(xs) * Ho * Wo
            launch(_fwd_kernel, (M, triton.cdiv(n_rows, BLOCK_R)), xs, w, b, b if act is None else act,
                   *(drop or (b, b, b)), zs, M, x.shape[1], n_rows, a, *g, K, max(16, pow2(O)), BLOCK_R, block_k(K),
                   *dot_dtype(x.dtype), xcl, zcl,
                   act is not None, drop is not None, num_warps=NUM_WARPS, num_stages=stages(x.dtype))
    return z


def _dw(gz, x, w_shape, stride: int, padding: int, y: torch.Tensor | None = None, act: torch.Tensor | None = None,
        gz_out: torch.Tensor | None = None, drop: tuple[torch.Tensor, ...] | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias gradients, (M, O, C, k, k) and (M, O) float32, from gz (B, M, O, Ho, Wo) and x
    (B, M, C, H, W), either stored contiguous or channels-last; row-split partial sums are added in a fixed
    order (deterministic). With `act` (codes, the forward's) gz is the gradient at the output y = act(z):
    the kernel takes the activation's derivative from y, and writes the gradient at z to `gz_out` (stored as y
    is) where given. With `drop` (the forward's) y and gz are the dropout's output and its gradient."""
    (x, xcl), (gz, gcl) = _readable(x), _readable(gz)
    if act is not None and not (y.is_contiguous() or is_channels_last(y)):
        raise ValueError(f"direct conv: the saved activation output must be contiguous or channels-last, got "
                         f"strides {y.stride()}")
    g = _geometry(x.shape, w_shape, stride, padding)
    C, KS, O = g[0], g[6], g[3]
    B, M = x.shape[:2]
    K = C * KS * KS
    # channels-last: one program per (member, row split) runs every tap (`_dw_taps_kernel`); else K chunks
    bk = block_k(K)
    n_rows, n_kc = B * g[4] * g[5], 1 if xcl else triton.cdiv(K, bk)
    joint = xcl and dw_form == "joint" and pow2(KS * KS) * C <= JOINT_COLUMNS
    rows = BLOCK_R_DW_JOINT if joint else BLOCK_R_DW
    n_split = max(1, min(triton.cdiv(n_rows, rows), triton.cdiv(2048, M * n_kc)))  # fill the GPU
    dw = torch.empty(n_split, M, O, K, device=x.device, dtype=torch.float32)
    db = torch.empty(n_split, M, O, device=x.device, dtype=torch.float32)
    # (y, act, key, thr, keep, gzo); placeholders the kernel never reads where off
    fused = (gz,) * 6 if act is None else (y, act, *(drop or (act,) * 3), gz if gz_out is None else gz_out)
    flags = (act is not None, act is not None and not y.is_contiguous(), gz_out is not None, drop is not None)
    with on_device(x.device):
        if xcl:
            launch(_dw_joint_kernel if joint else _dw_taps_kernel, (M, n_split), x, gz, *fused, dw, db, M, n_rows,
                   *g, K, max(16, pow2(O)), rows, pow2(KS * KS), *dot_dtype(x.dtype), gcl, *flags,
                   num_warps=NUM_WARPS, num_stages=stages(x.dtype))
        else:
            launch(_dw_kernel, (n_kc, M, n_split), x, gz, *fused, dw, db, M, n_rows, *g, K, max(16, pow2(O)),
                   BLOCK_R_DW, bk, *dot_dtype(x.dtype), gcl, *flags, num_warps=NUM_WARPS,
                   num_stages=stages(x.dtype))
    if n_split > 1:
        dw, db = dw.sum(0), db.sum(0)
    return dw.reshape(w_shape), db.reshape(M, O)


def _dx(gz, w, x_shape, stride: int, padding: int, cl: bool = False) -> torch.Tensor:
    """Input gradient (B, M, C, H, W) in gz's dtype, stored as `_alloc` says, in the form `dx_form` names.
    The masked form reads and writes contiguous tensors only (copies around it where the layout differs)."""
    g = _geometry(x_shape, w.shape, stride, padding)
    C, H, W, O, KS, S = g[0], g[1], g[2], g[3], g[6], g[7]
    B, M = gz.shape[:2]
    phases = dx_form.startswith("polyphase")
    n_p = S * S if dx_form == "polyphase_joint" else 1  # phases per program
    gz, gcl = _readable(gz) if phases else (gz.contiguous(), False)
    out = _alloc(gz, B, M, C, H, W, cl)
    dx = out if phases or out.is_contiguous() else torch.empty(B, M, C, H, W, device=gz.device, dtype=gz.dtype)
    xcl = not dx.is_contiguous()
    # rows per image and phase, K: polyphase has ceil(H/S) x ceil(W/S) rows and O ceil(k/S)^2 taps per phase
    per_image = -(-H // S) * -(-W // S) if phases else H * W
    taps = O * (-(-KS // S)) ** 2 if phases else O * KS * KS
    per_launch = max(1, MAX_GRID_Y // (S * S // n_p if phases else 1) * BLOCK_R // per_image)
    tail = (max(16, pow2(C)), BLOCK_R, block_k(taps), *dot_dtype(gz.dtype))
    with on_device(gz.device):
        for a in range(0, B, per_launch):
            gs, dxs = gz[a: a + per_launch], dx[a: a + per_launch]
            n_rows = len(gs) * per_image
            n_blocks = triton.cdiv(n_rows, BLOCK_R)
            if phases:  # grid axis 1: (row block, phase group), group fastest
                launch(_dx_phase_kernel, (M, S * S // n_p * n_blocks), gs, w, dxs, M, n_rows, *g, *tail, gcl,
                       xcl, n_p, num_warps=NUM_WARPS, num_stages=stages(gz.dtype))
            else:
                launch(_dx_kernel, (M, n_blocks), gs, w, dxs, M, n_rows, *g, *tail, num_warps=NUM_WARPS,
                       num_stages=stages(gz.dtype))
    if dx is not out:
        out.copy_(dx)
    return out


# Custom ops: opaque to torch.compile, differentiable through autograd (as the band ops of _convpool.py). The
# fake functions allocate with `_alloc`, so the strides compile plans with are the ones the kernels write.
@torch.library.custom_op("weightzoo::direct_conv", mutates_args=())
def _conv_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: int, padding: int,
             cl: bool, act: Optional[torch.Tensor], key: Optional[torch.Tensor], thr: Optional[torch.Tensor],
             keep: Optional[torch.Tensor]) -> torch.Tensor:
    return _fwd(x, w.contiguous(), b.contiguous(), stride, padding, cl, act, _drop(key, thr, keep))


def _drop(key, thr, keep) -> tuple[torch.Tensor, ...] | None:
    return None if key is None else (key, thr, keep)


@_conv_op.register_fake
def _(x, w, b, stride, padding, cl, act, key, thr, keep):
    O, Ho, Wo = _geometry(x.shape, w.shape, stride, padding)[3:6]
    return _alloc(x, x.shape[0], w.shape[0], O, Ho, Wo, cl)


@torch.library.custom_op("weightzoo::direct_conv_dw", mutates_args=())
def _dw_op(gz: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, y: Optional[torch.Tensor],
           act: Optional[torch.Tensor], key: Optional[torch.Tensor], thr: Optional[torch.Tensor],
           keep: Optional[torch.Tensor], cl: bool, write_gz: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dw (M, O, C, k, k), db (M, O)) float32, and where `write_gz` the gradient at the pre-activation (stored as
    `_alloc` says; else an empty tensor). `y`, `act` and (key, thr, keep): the forward's output, activation codes
    and dropout, or None."""
    out = _gz_out(gz, cl, write_gz)
    dw, db = _dw(gz, x, w.shape, stride, padding, y, act, out if write_gz else None, _drop(key, thr, keep))
    return dw, db, out


@_dw_op.register_fake
def _(gz, x, w, stride, padding, y, act, key, thr, keep, cl, write_gz):
    return (w.new_empty(w.shape, dtype=torch.float32), w.new_empty(w.shape[:2], dtype=torch.float32),
            _gz_out(gz, cl, write_gz))


def _gz_out(gz: torch.Tensor, cl: bool, write: bool) -> torch.Tensor:
    return _alloc(gz, *gz.shape, cl) if write else gz.new_empty(0)


@torch.library.custom_op("weightzoo::direct_conv_dx", mutates_args=())
def _dx_op(gz: torch.Tensor, w: torch.Tensor, x: torch.Tensor, stride: int, padding: int,
           cl: bool) -> torch.Tensor:
    """x is here for its shape and dtype only."""
    return _dx(gz.to(x.dtype), w.contiguous(), x.shape, stride, padding, cl)


@_dx_op.register_fake
def _(gz, w, x, stride, padding, cl):
    return _alloc(x, *x.shape, cl)


def _setup(ctx, inputs, output):
    x, w, _, stride, padding, cl, act, key, thr, keep = inputs
    ctx.save_for_backward(x, w, None if act is None else output, act, key, thr, keep)
    ctx.geometry = (stride, padding, cl)


def _backward(ctx, gy):
    """gy: the gradient at the op's output (the activation's output y, or its dropout, where those are fused)."""
    x, w, y, act, key, thr, keep = ctx.saved_tensors
    stride, padding, cl = ctx.geometry
    need_dx = ctx.needs_input_grad[0]
    dw, db, gz = _dw_op(gy, x, w, stride, padding, y, act, key, thr, keep, cl, need_dx and act is not None)
    dw, db = dw.to(w.dtype), db.to(w.dtype)
    dx = _dx_op(gy if act is None else gz, w, x, stride, padding, cl) if need_dx else None
    return dx, dw, db, None, None, None, None, None, None, None


_conv_op.register_autograd(_backward, setup_context=_setup)


def direct_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: int = 1, padding: int = 0,
                act: torch.Tensor | None = None, dropout: Dropout | None = None) -> torch.Tensor:
    """x (B, M or 1, C, H, W), w (M, O, C, k, k), b (M, O) -> (B, M, O, Ho, Wo) = conv2d per member, in x's
    dtype (bf16: tensor cores, fp32 accumulation; fp32: exact fp32 products), stored as `layout` says (its
    input gradient too). `act` (M,) int32 activation codes (`activation_codes`): each member's activation of
    its conv output instead, fused into the kernels; `dropout` (`Dropout`, with `act` only) the engine's hashed
    dropout of that too, its mask redrawn from the hash in the backward. The caller checks
    `_triton.available(x.device)` and expands a shared input when gradients are needed."""
    M = w.shape[0]
    if act is not None and (act.shape != (M,) or act.dtype != torch.int32):
        raise ValueError(f"direct conv: act must be ({M},) int32 activation codes, got {tuple(act.shape)} {act.dtype}")
    if dropout is not None:
        _check_dropout(dropout, M, act)
    key, thr, keep = dropout or (None, None, None)
    return _conv_op(x, w, b, stride, padding, layout == "channels_last", act, key, thr, keep)


def _check_dropout(dropout: Dropout, M: int, act: torch.Tensor | None) -> None:
    if act is None:
        raise ValueError("direct conv: a fused dropout needs the fused activation (act) before it")
    for name, t, dtype in zip(Dropout._fields, dropout, (torch.int64, torch.int64, torch.float32)):
        if t.shape != (M,) or t.dtype != dtype:
            raise ValueError(f"direct conv: dropout.{name} must be ({M},) {dtype}, got {tuple(t.shape)} {t.dtype}")
