"""What the Triton conv kernels (`_convpool.py`, `_directconv.py`) share: whether they can run, operand
dtypes, launches on the tensors' device, and recording launches to JIT-compile them in threads at setup."""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the callers fall back to PyTorch
    triton = tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NUM_WARPS = 4  # per program, every conv kernel (sweep on an H100: benchmarks/NOTES.md)
MAX_GRID_Y = 65535  # CUDA's limit on a launch grid's second axis


def checked_form(what: str, name: str, forms: tuple[str, ...]) -> str:
    """`name` where it is one of a kernel choice's `forms` (the engine's and the direct convs' `set_*` functions),
    else a ValueError naming them."""
    if name not in forms:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(forms)}")
    return name


def available(device: torch.device) -> bool:
    """Whether the Triton kernels run for tensors on `device` (CPU: Triton >= 3.9's interpreter; older
    interpreters fail on runtime loop bounds)."""
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return INTERPRET and tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 9)


def dot_dtype(dtype: torch.dtype):
    """bf16 tensor cores for bf16 activations; exact fp32 (no TF32) otherwise, to match torch's fp32 conv."""
    if dtype == torch.bfloat16 and not INTERPRET:  # the interpreter's bf16 dot is wrong (triton 3.6-3.9)
        return tl.bfloat16, "tf32"
    return tl.float32, "ieee"


def stages(dtype: torch.dtype) -> int:
    """Software-pipeline depth: fp32 operand tiles are twice as large, and three stages of them overflow an
    H100's 227 KiB of shared memory (cnn_gap's band gradient asked for 272 KiB)."""
    return 1 if dtype == torch.float32 else 3


def pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' (CPU/interpreter: nothing to do)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_RECORDED: list | None = None  # a list while `recording()`: launches are collected there, not run


def launch(kernel, grid, *args, **kwargs) -> None:
    if _RECORDED is None:
        kernel[grid](*args, **kwargs)
    else:
        _RECORDED.append((kernel, args, kwargs))


@contextlib.contextmanager
def recording():
    """Collect the band-kernel launches made inside (their outputs stay uninitialised) for `precompile`."""
    global _RECORDED
    outer, _RECORDED = _RECORDED, []
    try:
        yield _RECORDED
    finally:
        _RECORDED = outer


def distinct(launches: list) -> list:
    """One launch per kernel specialization: dtypes and 16-byte alignment of tensors, values of the rest."""
    spec = lambda a: (a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else repr(a)
    return list({(id(k), tuple(map(spec, args)), repr(sorted(kw.items()))): (k, args, kw)
                 for k, args, kw in launches}.values())


JIT_THREADS = 8  # threads that compile kernel specializations (`precompile`)


def precompile(launches: list, threads: int | None = None) -> int:
    """JIT-compile the distinct specializations among recorded launches in threads, without running them; later
    launches find them compiled. Triton's compiler passes release the GIL: 6 compiles took 1.90 s one after
    another and 0.54 s in 6 threads on the H100 (benchmarks/triton_jit_threads.py). Returns how many."""
    if INTERPRET or not launches:  # the interpreter compiles nothing
        return 0
    unique = distinct(launches)
    with ThreadPoolExecutor(min(threads or JIT_THREADS, len(unique))) as pool:
        for f in [pool.submit(k.warmup, *args, grid=(1,), **kw) for k, args, kw in unique]:
            f.result()
    return len(unique)
