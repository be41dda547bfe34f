"""Embed every (member, checkpoint) of a zoo with a fitted hyper-representation.

    python -m hyperrep.embed --zoo data/zoos/mnist_cnn_s_seed.h5 --model data/hyperrep/mnist_cnn_s_seed --device cuda
Tiny CPU run / no arguments: the default zoo and run (data/zoos/digits_default.h5, data/hyperrep/digits_default).
Writes NAME.embeddings.h5 beside the zoo: /embeddings [n_models, n_checkpoints, d_latent] float32 (NaN for
members that did not finish or diverged), /split per member (0 train, 1 val, 2 test, -1 not used in the fit),
/checkpoints/epoch; and NAME.embeddings.parquet with the keys (model_id, checkpoint, epoch, split, row).
With sequence=true also /sequence [n_models, n_checkpoints, n_tokens, d_latent], every token's latent, which
probes.evaluate reads as the `emb seq linear` column (SANE's probe on the full latent sequence).
"""
from __future__ import annotations

from zoo.cli import config_cli, run_cli

from ._embed import embed_zoo
from .config import EmbedConfig


def main(argv: list[str]) -> None:
    def extra(ap):
        ap.add_argument("--overwrite", action="store_true")
        ap.add_argument("--quiet", action="store_true")

    cfg, args = config_cli(EmbedConfig, argv, "python -m hyperrep.embed", __doc__,
                           {"zoo": "zoo", "model": "model", "out": "out", "device": "device",
                            "batch-size": "batch_size"}, extra=extra)
    path = embed_zoo(cfg.zoo, cfg.model, cfg.out or None, args.overwrite, cfg.device, cfg.batch_size, not args.quiet,
                     cfg.sequence)
    print(f"embeddings written to {path}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
