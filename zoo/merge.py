"""Join shard zoos (built with `--shard i/n`) into one zoo.

    python -m zoo.merge data/zoos/hyp.h5 data/zoos/hyp.0.h5 data/zoos/hyp.1.h5
Tiny CPU run:
    python -m zoo.build epochs=1 checkpoints=[0,1] --shard 0/2 --out /tmp/a.h5
    python -m zoo.build epochs=1 checkpoints=[0,1] --shard 1/2 --out /tmp/b.h5
    python -m zoo.merge /tmp/ab.h5 /tmp/a.h5 /tmp/b.h5
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ._config import UsageError, run_cli
from .store import merge


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m zoo.merge", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="merged zoo path (.h5)")
    ap.add_argument("shards", nargs="+", help="shard zoo files")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_intermixed_args(argv)
    for s in args.shards:
        if not Path(s).is_file():
            raise UsageError(f"shard {s} does not exist")
    print(f"zoo written to {merge(Path(args.out), [Path(s) for s in args.shards], args.overwrite)}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
