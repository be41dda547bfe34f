"""The fused transformer blocks (`zoo/_mlp.py`, `zoo/_attnblock.py`) timed alone at vit_t's shapes, forward and
backward each, over their launch knobs (warps a program, rows a step, programs a launch), beside the same block
layer by layer in torch (bf16 autocast, eager), with the bandwidth of the bytes each must move and the difference
from the fp32 layers.

Device run:  python benchmarks/block_kernels.py                  # vit_t: batch 64, 4,096 members, bf16 products
CPU smoke:   TRITON_INTERPRET=1 python benchmarks/block_kernels.py --members 2 --batch 2 --iters 1 --fp32 \
                 --mlp-grid 4/16/1 --attn-grid 4/1/64

Count first (vit_t: D 32, F 64, T 17 tokens, 2 heads; the residual stream fp32): x is 64 x 4,096 x 17 x 32 x 4 B =
570 MB. Either block's forward must read x and write y (1.14 GB, 0.24 ms at an H200's 4.8 TB/s, 0.34 ms at an H100's
3.35 TB/s); its backward reads x and dy and writes dx (1.71 GB, 0.36 / 0.51 ms). The MLP's products are ~37 GFLOP
forward and ~73 backward with the recompute (0.1 ms of tensor-core time); its elementwise work (layer norm, the
activation and their gradients, ~100 instructions a row and hidden unit) is of the same order as the bytes, so a
kernel at ~2x its bytes is at the machine's limit here.

Grids: `--mlp-grid warps/BLOCK/programs-per-member,...` and `--attn-grid warps/programs-per-member/rows,...`; the same
warps serve forward and backward (each column is its own launch, so the best of each is read off separately).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attention_kernels import vit_t_shapes  # noqa: E402
from directconv_kernels import timed  # noqa: E402

from zoo import _attnblock, _mlp  # noqa: E402

EPS = 1e-5


def mlp_layers(x, lnw, lnb, w1, b1, w2, b2):
    """The block layer by layer: x (B, M, T, D) -> x + fc2(tanh(fc1(LayerNorm(x))))."""
    ln = F.layer_norm(x, x.shape[-1:], eps=EPS) * lnw[None, :, None] + lnb[None, :, None]
    h = torch.tanh(torch.einsum("bmtd,mfd->bmtf", ln, w1) + b1[None, :, None])
    return x + torch.einsum("bmtf,mdf->bmtd", h, w2) + b2[None, :, None]


def attn_layers(x, lnw, lnb, wqkv, bqkv, wo, bo, heads):
    """x + out(attention(qkv(LayerNorm(x)))) with torch's fused attention."""
    B, M, T, D = x.shape
    ln = F.layer_norm(x, x.shape[-1:], eps=EPS) * lnw[None, :, None] + lnb[None, :, None]
    qkv = torch.einsum("bmtd,med->bmte", ln, wqkv) + bqkv[None, :, None]
    q, k, v = qkv.view(B, M, T, 3, heads, D // heads).permute(3, 0, 1, 4, 2, 5)
    o = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(B, M, T, D)
    return x + torch.einsum("bmtd,med->bmte", o, wo) + bo[None, :, None]


def _params(M, shapes, device):
    """Per-member (M, *shape) parameters: the layer norm's weight ~1, weights ~fan_in^-1/2, biases ~0.1."""
    return [torch.randn(M, *s, device=device) * (s[-1] ** -0.5 if len(s) == 2 else 0.1) + (1.0 if i == 0 else 0.0)
            for i, s in enumerate(shapes)]


def _time_layers(layers, x, ps, gy, bf16, iters, dev):
    """(forward ms, backward ms) of the torch layers, products in bf16 when `bf16`."""
    xg = x.clone().requires_grad_()
    pg = [p.clone().requires_grad_() for p in ps]
    ctx = lambda: torch.autocast(dev.type, torch.bfloat16, enabled=bf16)  # noqa: E731
    with torch.no_grad(), ctx():
        t_fwd = timed(lambda: layers(x, *ps), iters, dev)

    def both():
        with ctx():
            y = layers(xg, *pg)
        torch.autograd.grad(y, [xg, *pg], gy)
    return t_fwd, timed(both, iters, dev) - t_fwd


def _reference(layers, x, ps, gy):
    """fp32 y and dx of the layers."""
    xg = x.clone().requires_grad_()
    y = layers(xg, *ps)
    return y.detach(), torch.autograd.grad(y, xg, gy)[0]


def _row(name, t_fwd, t_bwd, nbytes, err_y, err_dx):
    fwd_b, bwd_b = 2 * nbytes, 3 * nbytes
    print(f"| {name} | {t_fwd:.3f} | {fwd_b / t_fwd / 1e6:.0f} | {t_bwd:.3f} | {bwd_b / t_bwd / 1e6:.0f} | "
          f"{err_y} | {err_dx} |", flush=True)


def _err(a, ref):
    return f"{float((a.float() - ref).abs().max()):.4f}"


def run_mlp(x, gy, grid, bf16, iters, dev):
    B, M, T, D = x.shape
    Fh = 2 * D
    ps = _params(M, [(D,), (D,), (Fh, D), (Fh,), (D, Fh), (D,)], dev)
    codes = _mlp.codes(["tanh"] * M, dev)
    y_ref, dx_ref = _reference(mlp_layers, x, ps, gy)
    _row("layers (torch)", *_time_layers(mlp_layers, x, ps, gy, bf16, iters, dev), x.numel() * 4, "-", "-")
    for cfg in grid:
        warps, block, per_member = (int(v) for v in cfg.split("/"))
        _mlp.WARPS, _mlp.BLOCK, _mlp.PROGRAMS = (warps, warps), (block, block), per_member * M
        fwd = lambda: _mlp._mlp_op(x, *ps, codes, None, None, None, EPS, bf16)  # noqa: E731
        bwd = lambda: _mlp._backward_op(gy, x, *ps[:5], codes, None, None, None, EPS, bf16)  # noqa: E731
        _row(f"fused warps={warps} BLOCK={block} programs={per_member}/member", timed(fwd, iters, dev),
             timed(bwd, iters, dev), x.numel() * 4, _err(fwd(), y_ref), _err(bwd()[0], dx_ref))


def run_attention(x, gy, grid, heads, bf16, iters, dev):
    B, M, T, D = x.shape
    ps = _params(M, [(D,), (D,), (3 * D, D), (3 * D,), (D, D), (D,)], dev)
    layers = lambda x, *ps: attn_layers(x, *ps, heads)  # noqa: E731
    y_ref, dx_ref = _reference(layers, x, ps, gy)
    _row("layers (torch, sdpa)", *_time_layers(layers, x, ps, gy, bf16, iters, dev), x.numel() * 4, "-", "-")
    for cfg in grid:
        warps, per_member, rows = (int(v) for v in cfg.split("/"))
        _attnblock.WARPS, _mlp.PROGRAMS, _attnblock.ROWS = (warps, warps), per_member * M, rows
        fwd = lambda: _attnblock._block_op(x, *ps, None, None, None, heads, False, EPS, bf16)  # noqa: E731
        bwd = lambda: _attnblock._backward_op(gy, x, *ps[:5], None, None, None, heads, False, EPS, bf16)  # noqa: E731
        _row(f"fused warps={warps} programs={per_member}/member rows={rows}", timed(fwd, iters, dev),
             timed(bwd, iters, dev), x.numel() * 4, _err(fwd(), y_ref), _err(bwd()[0], dx_ref))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    vit_t_shapes(ap)
    ap.add_argument("--fp32", action="store_true", help="fp32 products (default: bf16, as under autocast)")
    ap.add_argument("--mlp-grid", default="4/64/1,8/64/1,4/32/1,8/32/1,8/128/1,4/64/4,8/64/4,8/32/4")
    ap.add_argument("--attn-grid", default="4/1/64,8/1/64,4/1/32,8/1/128,4/4/64")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        print(torch.cuda.get_device_name(), "torch", torch.__version__)
    B, M, T, D = args.batch, args.members, args.tokens, args.dim
    torch.manual_seed(0)
    x = torch.randn(B, M, T, D, device=dev)  # image-major, as the engine's residual stream
    gy = torch.randn_like(x)
    print(f"\nB {B}, M {M}, T {T}, D {D}: x is {x.numel() * 4 / 1e6:.0f} MB; forward moves 2x, backward 3x")
    head = ("| form | fwd ms | fwd GB/s | bwd ms | bwd GB/s | max \\|y - fp32\\| | max \\|dx - fp32\\| |\n"
            "|---|---|---|---|---|---|---|")
    print(f"\nMLP block (F = {2 * D}, tanh)\n\n{head}")
    run_mlp(x, gy, args.mlp_grid.split(","), not args.fp32, args.iters, dev)
    print(f"\nattention block ({args.heads} heads)\n\n{head}")
    run_attention(x, gy, args.attn_grid.split(","), args.heads, not args.fp32, args.iters, dev)


if __name__ == "__main__":
    main()
