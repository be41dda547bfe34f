"""Per-layer timing of the direct (implicit-GEMM) conv kernels (zoo/_directconv.py) on smallcnn's and cnn_gap's
strided 3x3 convs: forward, weight gradient and the input-gradient forms (`zoo._directconv.DX_FORMS`), each on
contiguous tensors and (suffix "cl") on channels-last ones (`zoo._directconv.LAYOUTS`), the channels-last
forward and weight gradient with the activation fused (suffix "act": tanh in the forward's epilogue, its
derivative in dw, which then also writes the pre-activation gradient for dx), against
PyTorch's grouped conv (cuDNN) for the same call, with each call's useful TFLOP/s and the bandwidth of the
bytes it must move (its input, output and gradient tensors once each).

Device run:  python benchmarks/directconv_kernels.py                      # batch 64, 4,096 members, bf16
CPU smoke:   TRITON_INTERPRET=1 python benchmarks/directconv_kernels.py --members 2 --batch 2 --iters 1 \
                 --dtype fp32 --no-torch

Count first (bf16, batch 64 x 4,096 members = 262,144 images a step; useful MACs per image):
smallcnn conv1 24.3k, conv2 82.9k, conv3 9.2k; cnn_gap conv1 28.2k, conv2 113k, conv3 36.9k. The masked
input gradient spends k^2 / ceil(k/S)^2 = 9/4 of its MACs (stride 2) on taps that miss; polyphase does not.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo import _directconv as dc  # noqa: E402

# name: (C, H, O, k, stride, padding) on 1x28x28 MNIST
LAYERS = {"smallcnn.conv1": (1, 28, 16, 3, 2, 0), "smallcnn.conv2": (16, 13, 16, 3, 2, 0),
          "smallcnn.conv3": (16, 6, 16, 3, 2, 0), "cnn_gap.conv1": (1, 28, 16, 3, 2, 1),
          "cnn_gap.conv2": (16, 14, 16, 3, 2, 1), "cnn_gap.conv3": (16, 7, 16, 3, 2, 1)}


def timed(fn, iters: int, device: torch.device) -> float:
    """Milliseconds per call after one warm-up call (which JIT-compiles)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def grouped(x, w, b, stride, padding):
    """The same per-member conv as one grouped conv (groups = M): (B, M, C, H, W) -> (B, M, O, Ho, Wo)."""
    B, M, C, H, W = x.shape
    z = F.conv2d(x.reshape(B, M * C, H, W), w.reshape(-1, C, *w.shape[3:]).to(x.dtype), b.reshape(-1).to(x.dtype),
                 stride, padding, groups=M)
    return z.view(B, M, -1, *z.shape[-2:])


def run_layer(name: str, B: int, M: int, dtype, iters: int, device, torch_too: bool) -> list[dict]:
    """One row per call: ms, useful TFLOP/s and GB/s of the bytes the call must move."""
    C, H, O, k, s, p = LAYERS[name]
    Ho = dc.out_size(H, k, s, p)
    x = torch.randn(B, M, C, H, H, device=device, dtype=dtype)
    w = torch.randn(M, O, C, k, k, device=device) * 0.1
    b = torch.zeros(M, O, device=device)
    gz = torch.randn(B, M, O, Ho, Ho, device=device, dtype=dtype)
    flop = 2 * B * M * O * C * k * k * Ho * Ho  # useful MACs x 2, each of the three calls
    e = dtype.itemsize
    x_b, z_b = x.numel() * e, gz.numel() * e
    calls = {"fwd": (lambda: dc._fwd(x, w, b, s, p), x_b + z_b),
             "dw": (lambda: dc._dw(gz, x, w.shape, s, p), x_b + z_b)}  # dw and db
    for form in dc.DX_FORMS if C > 1 else ():  # a first layer gets no input gradient in training
        calls[f"dx {form}"] = (lambda form=form: (dc.set_dx_form(form), dc._dx(gz, w, x.shape, s, p)), x_b + z_b)
    # channels-last: x and gz stored so (where their channel counts allow), z and dx written so
    xc, gc = (t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3) for t in (x, gz))
    calls["fwd cl"] = (lambda: dc._fwd(xc, w, b, s, p, True), x_b + z_b)
    calls["dw cl"] = (lambda: dc._dw(gc, xc, w.shape, s, p), x_b + z_b)
    # the activation fused (tanh): in the forward's epilogue, and its derivative in dw, which reads the output y
    # and writes the pre-activation gradient for dx where a layer has one
    act = dc.activation_codes(["tanh"] * M, device)
    yc = dc._fwd(xc, w, b, s, p, True, act)
    gout = torch.empty_like(gc) if C > 1 else None
    calls["fwd cl act"] = (lambda: dc._fwd(xc, w, b, s, p, True, act), x_b + z_b)
    for form in dc.DW_FORMS:  # the channels-last weight-gradient forms (C = 1 inputs run `_dw_kernel` either way)
        calls[f"dw cl act {form}"] = (lambda form=form: (dc.set_dw_form(form), dc._dw(gc, xc, w.shape, s, p, yc, act,
                                                                                        gout)),
                                      x_b + (3 if C > 1 else 2) * z_b)
    for form in [f for f in dc.DX_FORMS if f.startswith("polyphase")] if C > 1 else ():
        calls[f"dx {form} cl"] = (lambda form=form: (dc.set_dx_form(form), dc._dx(gc, w, x.shape, s, p, True)),
                                  x_b + z_b)
    if torch_too:
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        z = grouped(xg, wg, b, s, p)
        calls["cudnn fwd"] = (lambda: grouped(x, w, b, s, p), x_b + z_b)
        calls["cudnn dx+dw"] = (lambda: torch.autograd.grad(z, [xg, wg], gz, retain_graph=True), 2 * (x_b + z_b))
    rows, saved = [], (dc.dx_form, dc.dw_form)  # the dx / dw calls set their form; the module's is restored after
    for call, (fn, nbytes) in calls.items():
        ms = timed(fn, iters, device)
        f = flop * (2 if call == "cudnn dx+dw" else 1)
        rows.append({"layer": name, "call": call, "ms": ms, "tflops": f / ms / 1e9, "gbs": nbytes / ms / 1e6})
    dc.set_dx_form(saved[0])
    dc.set_dw_form(saved[1])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--layers", default=",".join(LAYERS))
    ap.add_argument("--no-torch", action="store_true", help="skip the grouped-conv (cuDNN) reference")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    print(f"batch {args.batch} x {args.members} members, {args.dtype}\n\n| layer | call | ms | useful TFLOP/s | GB/s |"
          "\n|---|---|---|---|---|", flush=True)
    for name in args.layers.split(","):
        if name not in LAYERS:
            ap.error(f"unknown layer {name!r}; choose from {', '.join(LAYERS)}")
        for r in run_layer(name, args.batch, args.members, dtype, args.iters, dev, not args.no_torch):
            print(f"| {r['layer']} | {r['call']} | {r['ms']:.3f} | {r['tflops']:.1f} | {r['gbs']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
