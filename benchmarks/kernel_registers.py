"""Registers a thread, spilled bytes and shared memory of the fused transformer blocks' kernels (`zoo/_mlp.py`,
`zoo/_attnblock.py`) compiled for an H100/H200 (sm_90a) on a machine without a GPU: Triton compiles the kernel to
PTX for that target, and Triton's own ptxas reports what the launch will use.

Run (CPU only, ~5 s a kernel):  python benchmarks/kernel_registers.py
                                python benchmarks/kernel_registers.py --kernels mlp --warps 4,8 --rows 32,64,128

Why it matters: an SM has 65,536 registers. A 4-warp program at 255 registers a thread fits twice (8 warps an
SM), too few to keep the loads of a memory-bound loop in flight, and past 255 the compiler spills to local
memory. The launches are specialised as on the device: pointers 16-byte aligned, and the integer arguments that
vit_t's shapes make multiples of 16 marked so (Triton's launcher does the same).
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter's (read as the modules import)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo import _attnblock, _mlp  # noqa: E402
from zoo._triton import tl, triton  # noqa: E402

# vit_t at 4,096 members, batch 64: the residual stream (B, M, T, D) = (64, 4096, 17, 32), image-major
STRIDES = dict(sB=4096 * 17 * 32, sM=17 * 32, sT=32)
INTS = {**STRIDES, **{k.replace("s", p, 1): v for p in "ygo" for k, v in STRIDES.items()},
        "M": 4096, "n_rows": 64 * 17, "n_img": 64, "per_split": 64, "T": 17}
FLOATS = ("eps", "scale")
INT_PTRS = ("code_ptr",)
I64_PTRS = ("key_ptr", "thr_ptr")


def _signature(kernel, consts: dict) -> tuple[dict, dict]:
    """Triton types of the kernel's arguments, and the 16-divisibility marks the launcher would give them."""
    sig, attrs = {}, {}
    for i, a in enumerate(kernel.arg_names):
        if a in consts:
            sig[a] = "constexpr"
            continue
        sig[a] = ("*i32" if a in INT_PTRS else "*i64" if a in I64_PTRS else "*fp32" if a.endswith("_ptr")
                  else "fp32" if a in FLOATS else "i32")
        if a.endswith("_ptr") or INTS.get(a, 1) % 16 == 0 and a in INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _ptxas() -> str:
    """Triton's bundled ptxas that reads its PTX version (the Blackwell build where there are two)."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    raise SystemExit(f"no ptxas under {bin_dir}: this Triton build cannot compile for NVIDIA GPUs offline")


def usage(kernel, consts: dict, warps: int, stages: int = 3) -> dict:
    """{'registers', 'spill_bytes', 'shared_bytes'} of `kernel` compiled for sm_90a with `consts`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, attrs = _signature(kernel, consts)
    src = ASTSource(fn=kernel, signature=sig, attrs=attrs,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps,
                                                                                  num_stages=stages))
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        Path(ptx).write_text(compiled.asm["ptx"])
        info = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", ptx, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    return dict(registers=int(regs.group(1)), spill_bytes=int(spill.group(1)) if spill else 0,
                shared_bytes=compiled.metadata.shared)


def cases(kernels: list[str], warps: list[int], rows: list[int], drop: bool):
    """(name, kernel, consts, warps) at vit_t's shapes, bf16 products."""
    for which, w, r in itertools.product(kernels, warps, rows):
        if which == "mlp":
            c = dict(D=32, F=64, BLOCK=r, DROP=drop, DT=tl.bfloat16, PREC="tf32")
            yield f"mlp forward BLOCK={r}", _mlp._fwd_kernel, c, w
            yield f"mlp backward BLOCK={r}", _mlp._bwd_kernel, c, w
        else:
            c = dict(D=32, H=2, R=r, IMG=r // 17, CAUSAL=False, DROP=drop, DT=tl.bfloat16, PREC="tf32")
            yield f"attention forward R={r}", _attnblock._fwd_kernel, c, w
            yield f"attention backward R={r}", _attnblock._bwd_kernel, c, w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="mlp,attention")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--rows", default="64", help="rows a step (the MLP's BLOCK, the attention block's R)")
    ap.add_argument("--dropout", action="store_true", help="the kernels with their dropout masks")
    args = ap.parse_args()
    if triton is None:
        raise SystemExit("needs Triton")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns unless set; 1 is the default
    print(f"sm_90a, vit_t shapes, bf16 products, Triton {triton.__version__}\n")
    print("| kernel | warps | registers | spilled bytes | shared KiB | programs an SM (registers) |\n"
          "|---|---|---|---|---|---|")
    for name, kernel, consts, w in cases(args.kernels.split(","), [int(v) for v in args.warps.split(",")],
                                         [int(v) for v in args.rows.split(",")], args.dropout):
        u = usage(kernel, consts, w)
        per_sm = 65536 // (max(u["registers"], 1) * 32 * w)
        print(f"| {name} | {w} | {u['registers']} | {u['spill_bytes']} | {u['shared_bytes'] / 1024:.0f} | {per_sm} |",
              flush=True)


if __name__ == "__main__":
    main()
