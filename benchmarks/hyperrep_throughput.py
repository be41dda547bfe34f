"""Hyper-representation training throughput: tokens/s and model FLOPs utilisation (bf16).

Device run (SANE CNN size: d_model 1024, 8 encoder + 8 decoder blocks, 8 heads, latent 128, windows of 48):
    python benchmarks/hyperrep_throughput.py
CPU smoke run:
    python benchmarks/hyperrep_throughput.py --d-model 64 --layers 1 --heads 4 --batch 4 --steps 2 --no-compile

One training step = both views of `batch` models (2 x batch x window tokens): forward, SANE loss, backward,
AdamW. FLOPs are counted analytically: 6 x (matmul parameters) per token plus attention (12 x T x d per
token per block, forward and backward); MFU = achieved FLOP/s over 989 TFLOP/s (H100 SXM dense bf16),
also shown against the 798 TFLOP/s a large bf16 matmul reached on this device (KINDS.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hyperrep.model import AEShape, HyperAE, sane_loss  # noqa: E402

PEAK, MEASURED = 989e12, 798e12


def flops_per_token(model: HyperAE, window: int) -> float:
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "tables" not in n)
    d, blocks = model.shape.d_model, 2 * model.shape.n_layers
    return 6 * matmul + blocks * 12 * window * d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--latent", type=int, default=128)
    ap.add_argument("--token-size", type=int, default=64)
    ap.add_argument("--window", type=int, default=48)
    ap.add_argument("--batch", type=int, default=256, help="models per step (two views each)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = AEShape(args.token_size, (4096, 64, 1024), args.d_model, args.layers, args.heads, args.latent, args.latent,
                    0.0)
    model = HyperAE(shape).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    B, T, S = args.batch, args.window, args.token_size
    tokens = torch.randn(2 * B, T, S, device=dev)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    pos = torch.stack([torch.arange(T), torch.zeros(T, dtype=torch.long), torch.arange(T)], -1)
    pos = pos.to(dev).expand(2 * B, -1, -1)

    def step():
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            recon, _, proj = model(tokens, pos)
        loss, _, _ = sane_loss(recon.float(), tokens, mask, proj[:B].float(), proj[B:].float(), 0.05, 0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    fn = step if args.no_compile else torch.compile(step)
    for _ in range(3):
        fn()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = fn()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = 2 * B * T / dt
    achieved = tok_s * flops_per_token(model, T)
    n_par = sum(p.numel() for p in model.parameters())
    print(f"{'GPU ' + torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}; model {n_par / 1e6:.1f}M params, "
          f"{flops_per_token(model, T) / 1e9:.2f} GFLOP/token (train); step {dt * 1e3:.1f} ms for {2 * B * T} tokens")
    print(f"tokens/s {tok_s:,.0f}  achieved {achieved / 1e12:.1f} TFLOP/s  MFU {achieved / PEAK:.1%} of 989  "
          f"({achieved / MEASURED:.1%} of the measured 798)  loss {float(loss):.3f}"
          + (f"  peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if dev.type == "cuda" else ""))


if __name__ == "__main__":
    main()
