"""Attention for a population of tiny transformers, each form timed alone: the engine's batched matmuls ("bmm":
permuted copies, q k^T, softmax, p v), torch's fused scaled_dot_product_attention ("sdpa", on (B, M heads, T, d)
copies) and our Triton kernel (`zoo/_attention.py`) at several sequences per program, forward and forward +
backward, from the qkv projection's output (B, M, T, 3 D) to y (B, M, T, D), with the bandwidth of the bytes each
must move (qkv and y forward; qkv, dy and dqkv backward, our kernel's minimum) and the difference from the fp32
result.

Device run:  python benchmarks/attention_kernels.py                 # vit_t: batch 64, 4,096 members, bf16
CPU smoke:   TRITON_INTERPRET=1 python benchmarks/attention_kernels.py --members 2 --batch 2 --iters 1 --dtype fp32

Count first (vit_t: T = 17 tokens, 2 heads of 16 dims, 64 x 4,096 x 2 = 524k sequences): qkv is 64 x 4,096 x 17 x
96 bf16 = 856 MB, y 285 MB; a forward must move ~1.14 GB (0.24 ms at 4.8 TB/s), a backward ~2.0 GB more. The MACs
(2 T^2 d per sequence and direction, ~0.6 GFLOP forward) are nothing to the tensor cores.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from directconv_kernels import timed  # noqa: E402

from zoo import _attention  # noqa: E402


def bmm_form(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    B, M, T, D3 = qkv.shape
    d = D3 // 3 // heads
    q, k, v = qkv.reshape(B * M, T, 3, heads, d).permute(2, 0, 3, 1, 4)
    att = torch.softmax((q @ k.transpose(-1, -2)).float() * d ** -0.5, dim=-1)
    return (att.to(v.dtype) @ v).transpose(1, 2).reshape(B, M, T, D3 // 3)


def sdpa_form(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    B, M, T, D3 = qkv.shape
    d = D3 // 3 // heads
    q, k, v = qkv.view(B, M, T, 3, heads, d).permute(3, 0, 1, 4, 2, 5).reshape(3, B, M * heads, T, d)
    y = F.scaled_dot_product_attention(q, k, v)
    return y.view(B, M, heads, T, d).transpose(2, 3).reshape(B, M, T, D3 // 3)


def triton_form(seq: int):
    def run(qkv: torch.Tensor, heads: int) -> torch.Tensor:
        _attention.SEQ_PER_PROGRAM = seq
        return _attention.attention(qkv, heads)
    return run


def vit_t_shapes(ap: argparse.ArgumentParser) -> None:
    """The options of a kernel timing at vit_t's shapes (4,096 members, batch 64) and its iterations."""
    ap.add_argument("--members", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=17)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    vit_t_shapes(ap)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--seq", default="1,4,16", help="sequences per Triton program to time, comma-separated")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    B, M, T, D = args.batch, args.members, args.tokens, args.dim
    if dev.type == "cuda":
        print(torch.cuda.get_device_name(), "torch", torch.__version__)
    # the qkv projection writes members outermost (batched matmuls over members): (B, M, T, 3 D) with M-major strides
    qkv = torch.randn(M, B, T, 3 * D, device=dev).to(dtype).transpose(0, 1).requires_grad_()
    gy = torch.randn(B, M, T, D, device=dev, dtype=dtype)
    ref = bmm_form(qkv.detach().float(), args.heads)
    size = qkv.element_size()
    fwd_bytes = (qkv.numel() + gy.numel()) * size
    bwd_bytes = (2 * qkv.numel() + gy.numel()) * size
    forms = {"bmm": bmm_form, "sdpa": sdpa_form} | {f"triton seq={s}": triton_form(int(s)) for s in args.seq.split(",")}
    print(f"\nB {B}, M {M}, T {T}, D {D}, heads {args.heads}, {args.dtype}: forward moves {fwd_bytes / 1e9:.2f} GB, "
          f"backward {bwd_bytes / 1e9:.2f} GB\n")
    print("| form | fwd ms | fwd GB/s | fwd+bwd ms | bwd GB/s | max \\|y - fp32\\| |\n|---|---|---|---|---|---|")
    for name, fn in forms.items():
        with torch.no_grad():
            t_fwd = timed(lambda fn=fn: fn(qkv, args.heads), args.iters, dev)
            err = float((fn(qkv, args.heads).float() - ref).abs().max())
        t_all = timed(lambda fn=fn: torch.autograd.grad(fn(qkv, args.heads), qkv, gy), args.iters, dev)
        print(f"| {name} | {t_fwd:.3f} | {fwd_bytes / t_fwd / 1e6:.0f} | {t_all:.3f} | "
              f"{bwd_bytes / max(t_all - t_fwd, 1e-9) / 1e6:.0f} | {err:.4f} |", flush=True)


if __name__ == "__main__":
    main()
