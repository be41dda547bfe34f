"""Derive a zoo's Parquet table from its HDF5 file again (the table is derived data; readers already ignore a
table whose build id differs from the HDF5 file's, e.g. after an interrupted --overwrite).

    python -m zoo.table data/zoos/digits_default.h5
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .cli import run_cli
from .io import output_lock
from .store import open_zoo
from .writer import write_table


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m zoo.table", description=__doc__.split("\n")[0])
    ap.add_argument("zoo", help="zoo .h5")
    args = ap.parse_args(argv)
    path = Path(args.zoo)
    with open_zoo(path):  # a readable zoo, or one clear line
        pass
    with output_lock(path):
        print(f"table written to {write_table(path)}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
