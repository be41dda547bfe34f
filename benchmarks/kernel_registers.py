"""Registers a thread, spilled bytes and shared memory of the Triton kernels of a training step (the fused
transformer blocks, `zoo/_mlp.py`, `zoo/_attnblock.py`; the direct convs, `zoo/_directconv.py`) compiled for an
H100/H200 (sm_90a) on a machine without a GPU: Triton compiles each kernel to PTX for that target, and Triton's own
ptxas reports what the launch will use.

Run (CPU only, ~5 s a kernel):  python benchmarks/kernel_registers.py
                                python benchmarks/kernel_registers.py --kernels mlp --warps 4,8 --rows 32,64,128
                                python benchmarks/kernel_registers.py --kernels conv --convs cnn_gap,smallcnn

The launches are the real ones: each module's host code runs on meta tensors of the training shapes (4,096
members, batch 64, bf16; vit_t's block parameters as views of its flat (M, 19,658) buffer; the convs
channels-last with tanh fused, as the engine trains them) with its launches recorded (`zoo._triton.recording`),
and each recorded launch is compiled with the specialisation Triton's launcher gives its arguments (pointers
16-byte aligned, integers that are multiples of 16 marked so).

Why it matters: an SM has 65,536 registers. A 4-warp program at 255 registers a thread fits twice (8 warps an
SM), too few to keep the loads of a memory-bound loop in flight, and past 255 the compiler spills to local
memory.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's (read as the modules import)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from directconv_kernels import LAYERS  # noqa: E402

from zoo import _attnblock, _directconv, _mlp  # noqa: E402
from zoo._triton import recording, triton  # noqa: E402

B, M, P = 64, 4096, 19658  # batch, members, vit_t's parameters a member
# vit_t's first attention and MLP blocks in its flat parameter row: name -> (offset, shape)
ATTN = {"ln_w": (2176, (32,)), "ln_b": (2208, (32,)), "wqkv": (2240, (96, 32)), "bqkv": (5312, (96,)),
        "wo": (5408, (32, 32)), "bo": (6432, (32,))}
MLP = {"ln_w": (6464, (32,)), "ln_b": (6496, (32,)), "w1": (6528, (64, 32)), "b1": (8576, (64,)),
       "w2": (8640, (32, 64)), "b2": (10688, (32,))}
_PTR_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
              torch.int64: "*i64", torch.uint8: "*u8", torch.bool: "*i1"}


def _ptxas() -> str:
    """Triton's bundled ptxas that reads its PTX version (the Blackwell build where there are two)."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    raise SystemExit(f"no ptxas under {bin_dir}: this Triton build cannot compile for NVIDIA GPUs offline")


def launch_source(kernel, args: tuple, kwargs: dict):
    """(ASTSource, compile options) of one recorded launch: constexpr parameters fixed, tensors as typed pointers
    (16-byte aligned, as meta tensors and fresh allocations are), integers of 16-multiples marked so."""
    from triton.compiler import ASTSource
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    values = {**dict(zip(kernel.arg_names, args)), **{k: v for k, v in kwargs.items() if k not in options}}
    sig, consts, attrs = {}, {}, {}
    for i, prm in enumerate(kernel.params):
        v = values[prm.name]
        if prm.is_constexpr or v is None:
            sig[prm.name], consts[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[prm.name] = _PTR_TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[prm.name] = "i1"
        elif isinstance(v, int):
            sig[prm.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[prm.name] = "fp32"
    return ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs), options


def usage(kernel, args: tuple, kwargs: dict) -> dict:
    """{'registers', 'spill_bytes', 'shared_bytes', 'warps'} of one recorded launch compiled for sm_90a."""
    from triton.backends.compiler import GPUTarget
    src, options = launch_source(kernel, args, kwargs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        Path(ptx).write_text(compiled.asm["ptx"])
        info = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", ptx, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    return dict(registers=int(regs.group(1)), spill_bytes=int(spill.group(1)) if spill else 0,
                shared_bytes=compiled.metadata.shared, warps=options.get("num_warps", 4))


def _block_params(layout: dict) -> list[torch.Tensor]:
    """The block's parameters as views of the (M, P) flat buffer, as the engine passes them."""
    flat = torch.empty(M, P, device="meta")
    return [flat[:, o: o + torch.Size(s).numel()].view(M, *s) for o, s in layout.values()]


def _dropout(n_layers: int, drop: bool) -> tuple:
    if not drop:
        return None, None, None
    return (torch.empty(n_layers, M, dtype=torch.int64, device="meta"),
            torch.empty(M, dtype=torch.int64, device="meta"), torch.empty(M, device="meta"))


@contextlib.contextmanager
def _knobs(module, **values):
    saved = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


def block_launches(which: str, warps: int, rows: int, drop: bool) -> list[tuple[str, object, tuple, dict]]:
    """(name, kernel, args, kwargs) of a vit_t block's forward and backward at `warps` and `rows` a step."""
    x = torch.empty(B, M, 17, 32, device="meta")  # the residual stream, image-major, fp32
    if which == "mlp":
        ps, codes = _block_params(MLP), torch.empty(M, dtype=torch.int32, device="meta")
        knobs, call = dict(WARPS=(warps, warps), BLOCK=(rows, rows)), lambda: (
            _mlp._mlp_op._init_fn(x, *ps, codes, *_dropout(2, drop), 1e-5, True),
            _mlp._backward_op._init_fn(x, x, *ps[:5], codes, *_dropout(2, drop), 1e-5, True))
        module, label = _mlp, f"BLOCK={rows}"
    else:
        ps = _block_params(ATTN)
        knobs, call = dict(WARPS=(warps, warps), ROWS=rows), lambda: (
            _attnblock._block_op._init_fn(x, *ps, *_dropout(1, drop), 2, False, 1e-5, True),
            _attnblock._backward_op._init_fn(x, x, *ps[:5], *_dropout(1, drop), 2, False, 1e-5, True))
        module, label = _attnblock, f"R={rows}"
    with _knobs(module, **knobs), recording() as rec:
        call()
    return [(f"{which} {'forward' if i == 0 else 'backward'} {label}", k, a, kw) for i, (k, a, kw) in enumerate(rec)]


def conv_launches(arch: str, dw_form: str, dropout: bool = False) -> list[tuple[str, object, tuple, dict]]:
    """(name, kernel, args, kwargs) of each direct-conv launch of one training step of `arch`'s convs (or of the
    one layer `arch` names, as in `directconv_kernels.LAYERS`): forward with
    the activation, weight gradient in `dw_form` (writing the pre-activation gradient where a layer has an input
    gradient), input gradient in the module's form; with `dropout`, the engine's dropout fused after the activation."""
    act = _directconv.activation_codes(["tanh"] * M, "meta")
    dtypes = (torch.int64, torch.int64, torch.float32)  # key, threshold, keep
    drop = _directconv.Dropout(*(torch.empty(M, device="meta", dtype=t) for t in dtypes)) if dropout else None
    out = []
    for name, (C, H, O, k, s, p) in LAYERS.items():
        if not (name == arch or name.startswith(arch + ".")):
            continue
        Ho = _directconv.out_size(H, k, s, p)
        x = torch.empty(B, M, H, H, C, device="meta", dtype=torch.bfloat16).permute(0, 1, 4, 2, 3)  # channels-last
        gz = torch.empty(B, M, Ho, Ho, O, device="meta", dtype=torch.bfloat16).permute(0, 1, 4, 2, 3)
        w, b = torch.empty(M, O, C, k, k, device="meta"), torch.empty(M, O, device="meta")
        with _knobs(_directconv, dw_form=dw_form), recording() as rec:
            y = _directconv._fwd(x, w, b, s, p, True, act, drop)
            _directconv._dw(gz, x, w.shape, s, p, y, act, torch.empty_like(gz) if C > 1 else None, drop)
            if C > 1:  # a first layer gets no input gradient in training
                _directconv._dx(gz, w, x.shape, s, p, True)
        out += [(f"{name} {kern.fn.__name__}", kern, a, kw) for kern, a, kw in rec]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="mlp,attention,conv")
    ap.add_argument("--warps", default="4,8", help="the blocks' warps a program (the convs: the module's)")
    ap.add_argument("--rows", default="64", help="the blocks' rows a step (the MLP's BLOCK, the attention's ROWS)")
    ap.add_argument("--convs", default="cnn_gap,smallcnn",
                    help="architectures (or single layers, e.g. cnn_gap.conv2) whose direct convs to compile")
    ap.add_argument("--dw", default=",".join(_directconv.DW_FORMS),
                    help="the convs' channels-last weight-gradient forms (zoo._directconv.DW_FORMS)")
    ap.add_argument("--dropout", action="store_true",
                    help="the kernels with their dropout masks (the convs: fused after the activation)")
    args = ap.parse_args()
    if triton is None:
        raise SystemExit("needs Triton")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns unless set; 1 is the default
    kinds = args.kernels.split(",")
    launches = [launch for which in ("mlp", "attention") if which in kinds
                for w in (int(v) for v in args.warps.split(",")) for r in (int(v) for v in args.rows.split(","))
                for launch in block_launches(which, w, r, args.dropout)]
    launches += [launch for arch in args.convs.split(",") if "conv" in kinds
                 for i, form in enumerate(args.dw.split(",")) for launch in conv_launches(arch, form, args.dropout)
                 if i == 0 or "_dw_" in launch[0]]  # the other kernels once
    print(f"sm_90a, 4,096 members, batch 64, bf16 products, Triton {triton.__version__}\n")
    print("| kernel | warps | registers | spilled bytes | shared KiB | programs an SM (registers) |\n"
          "|---|---|---|---|---|---|")
    for name, kernel, a, kw in launches:
        u = usage(kernel, a, kw)
        per_sm = 65536 // (max(u["registers"], 1) * 32 * u["warps"])
        print(f"| {name} | {u['warps']} | {u['registers']} | {u['spill_bytes']} | {u['shared_bytes'] / 1024:.0f} | "
              f"{per_sm} |", flush=True)


if __name__ == "__main__":
    main()
