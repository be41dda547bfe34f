"""Output discipline shared by every command: one exclusive lock per output, and writes that land whole
(write a temporary file beside the target, then one rename) or not at all.

    with output_lock(out):                      # a second writer of `out` fails with the first one's pid
        with atomic_path(out) as tmp:           # write tmp; it replaces `out` only if the block succeeds
            write_everything(tmp)
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from .cli import UsageError


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[Path]:
    """Hold an exclusive advisory lock for writing `out` (a file `OUT.lock` holding the owner's pid). A second
    process asking for it fails at once with one line naming the owner; the lock ends with the block or the
    process (the kernel drops it on exit, even after kill -9), so a stale lock file never blocks a rerun."""
    out = Path(out)
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(f"{out} is being written by another process (pid {owner}); wait for it to finish or "
                             f"stop it, then rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def tmp_path(out: Path) -> Path:
    """The temporary file `out` is written to before its rename (same folder: the rename is atomic)."""
    return out.with_name(out.name + ".tmp")


@contextlib.contextmanager
def atomic_path(out: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `out`; on success it is renamed onto `out` (replacing it), on failure it is
    removed and `out` is untouched."""
    out = Path(out)
    tmp = tmp_path(out)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def save_figure(fig, out: str | Path, dpi: int = 120) -> Path:
    """A matplotlib figure as a PNG at `out`, laid out tightly, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return Path(out)


def check_new_output(out: Path, overwrite: bool, what: str = "output") -> None:
    """`out` may be written: absent, or present with --overwrite (never a directory where a file goes)."""
    if out.is_dir():
        raise UsageError(f"{what} {out} is a directory; pass a file path")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it or choose another output path")


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside the block is weights-only (no pickled code runs), whatever the environment:
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 is set aside and TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 set, then both restored.
    Third-party loaders inside the block (Lightning's resume) obey it too."""
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD")}
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def safe_torch_load(path: Path, what: str):
    """torch.load of a file we wrote, weights-only; any failure is one line naming the file."""
    import torch

    try:
        with weights_only_loads():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated, foreign or code-carrying files
        raise UsageError(f"{path} is not a readable {what} ({type(e).__name__}); it may be truncated or not "
                         f"written by weightzoo") from None
