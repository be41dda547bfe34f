"""Embed every (member, checkpoint) of a zoo with a fitted hyper-representation.

    python -m hyperrep.embed --zoo data/zoos/mnist_cnn_s_seed.h5 --model data/hyperrep/mnist_cnn_s_seed --device cuda
Tiny CPU run / no arguments: the default zoo and run (data/zoos/digits_default.h5, data/hyperrep/digits_default).
Writes NAME.embeddings.h5 beside the zoo: /embeddings [n_models, n_checkpoints, d_latent] float32 (NaN for
members that did not finish or diverged), /split per member (0 train, 1 val, 2 test, -1 not used in the fit),
/checkpoints/epoch; and NAME.embeddings.parquet with the keys (model_id, checkpoint, epoch, split, row).
"""
from __future__ import annotations

import argparse

import torch

from zoo.cli import run_cli

from ._embed import embed_zoo


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m hyperrep.embed", description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", default="data/zoos/digits_default.h5")
    ap.add_argument("--model", default="data/hyperrep/digits_default", help="run directory of hyperrep.fit")
    ap.add_argument("--out", help="default: <zoo>.embeddings.h5 beside the zoo")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    path = embed_zoo(args.zoo, args.model, args.out, args.overwrite, args.device, args.batch_size, not args.quiet)
    print(f"embeddings written to {path}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
