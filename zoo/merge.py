"""Old name of `python -m zoo.join` (joining shard zoos); kept so existing scripts keep working.

"Merging" in weightzoo means model merging (`python -m pairs.evaluate`); joining shards is `zoo.join`.
"""
from __future__ import annotations

import sys

from .cli import run_cli
from .join import main

if __name__ == "__main__":
    print("note: python -m zoo.merge is now python -m zoo.join (same arguments)", file=sys.stderr)
    raise SystemExit(run_cli(main))
