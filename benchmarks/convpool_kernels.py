"""Per-layer timing of the Triton conv + max-pool kernels (zoo/_convpool.py) against PyTorch's grouped
conv + max-pool, forward and backward, on cnn_s's conv stages, for a few tile configurations (band kernels
against the earlier gathered-patch kernels: results/h100_s3_convpool_kernels_b64.log).

Device run:  python benchmarks/convpool_kernels.py                       # batch 64, 4,096 members
             python benchmarks/convpool_kernels.py --batch 10 --members 2560   # the HYP zoo's shape
CPU smoke:   TRITON_INTERPRET=1 python benchmarks/convpool_kernels.py --members 2 --batch 2 --iters 1 \
                 --configs 64x128x4

Prints ms per call and the bytes a perfectly fused kernel must move (input, pooled output, winner
index; gradients alike), as an effective bandwidth.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo import _convpool  # noqa: E402

# name: (C, H, O, k, stride, pool) of cnn_s on 1x28x28
LAYERS = {"cnn_s.conv1": (1, 28, 8, 5, 1, 2), "cnn_s.conv2": (8, 12, 6, 5, 1, 2), "cnn_s.conv3": (6, 4, 4, 2, 1, 1)}


def timed(fn, iters, device):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def run_layer(name, B, M, dtype, iters, device, torch_too=True):
    C, H, O, k, s, p = LAYERS[name]
    x = torch.randn(B, M, C, H, H, device=device, dtype=dtype, requires_grad=C > 1)
    w = torch.randn(M, O, C, k, k, device=device, requires_grad=True)
    b = torch.randn(M, O, device=device, requires_grad=True)
    out = {}
    for path, fn in (("triton", _convpool.conv_pool), ("torch", _convpool._reference))[:2 if torch_too else 1]:
        z = fn(x, w, b, s, 0, p)
        g = torch.randn_like(z)
        inputs = [w, b] + ([x] if C > 1 else [])
        out[path + " fwd"] = timed(lambda fn=fn: fn(x, w, b, s, 0, p), iters, device)
        fwd_bwd = lambda fn=fn, g=g, inputs=inputs: torch.autograd.grad(fn(x, w, b, s, 0, p), inputs, g)
        out[path + " fwd+bwd"] = timed(fwd_bwd, iters, device)
    e = dtype.itemsize
    fwd_bytes = B * M * (C * H * H * e + z[0, 0].numel() * (e + 1))
    return out, fwd_bytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--configs", default="64x128x4,128x128x8,32x64x4,64x64x4",
                    help="ROWSxROWS_DTxNUM_WARPS, comma-separated (rows per program: forward, band gradient)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for i, cfg in enumerate(args.configs.split(",")):
        _convpool.BAND_R, _convpool.BAND_R_DT, _convpool.NUM_WARPS = map(int, cfg.split("x"))
        for name in LAYERS:
            t, nbytes = run_layer(name, args.batch, args.members, dtype, args.iters, device, torch_too=i == 0)
            print(f"{cfg} {name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in t.items())
                  + f"; triton fwd moves >= {nbytes / 2**30:.2f} GiB = {nbytes / t['triton fwd'] / 1e6:.0f} GB/s",
                  flush=True)


if __name__ == "__main__":
    main()
