"""Sample new networks from a hyper-representation, fine-tune them beside reference groups, and test
whether they are new or copies of the training members (the memorization test).

Full size (one GPU): python -m hyperrep.sample --zoo data/zoos/mnist_cnn_s_seed.h5 \\
                         --model data/hyperrep/mnist_cnn_s_seed --n 100 --top 0.3 subsample=5 finetune=[0,1,5,25]
Transfer: ... dataset=fashion_mnist --out data/samples/mnist_to_fashion.h5
Tiny CPU run / no arguments: the default zoo and run, 100 members per group, fine-tuned 0 / 1 / 5 epochs.
Writes OUT.h5 (a zoo: every member with its `group` and `source_member`), OUT.novelty.csv (per member at
epoch 0: accuracy, nearest training member by raw and aligned L2, max wrong-prediction IoU, max agreement),
OUT.finetune.csv, OUT.summary.md, OUT.novelty.png (accuracy vs novelty) and OUT.finetune.png.
"""
from __future__ import annotations

from zoo.cli import config_cli, run_cli

from ._sample import sample_zoo
from .config import SampleConfig


def main(argv: list[str]) -> None:
    cfg, args = config_cli(SampleConfig, argv, "python -m hyperrep.sample", __doc__,
                           {"zoo": "zoo", "model": "model", "out": "out", "n": "n", "top": "top", "device": "device"},
                           extra=lambda ap: ap.add_argument("--quiet", action="store_true"))
    out = sample_zoo(cfg, progress=not args.quiet)
    print(f"sampled zoo written to {out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
