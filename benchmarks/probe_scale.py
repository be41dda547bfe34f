"""Time the probe stage at full zoo size without training a zoo: a synthetic smallcnn zoo (random weights, a
test accuracy planted as a linear read-out of them plus noise, random hyperparameters) written with ZooWriter,
then load_probe_data and evaluate_probes on the weight columns, each timed. Plans the probe stage of
`full_zoo_smallcnn.sh` (which must fit beside a build and a fit in one device call).

    python benchmarks/probe_scale.py --members 10000          # the full-size zoo's 40,000 rows
    python benchmarks/probe_scale.py --members 500            # a quick CPU run
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import zoo
from probes import evaluate_probes, load_probe_data
from zoo import ModelSpec, ZooWriter

SMALLCNN = ModelSpec("smallcnn", {}, (1, 28, 28), 10)


def write_zoo(path: Path, members: int, checkpoints: int, seed: int = 0) -> None:
    """Member m, checkpoint c: weights N(0, 0.1) + c * drift; test_acc a sigmoid of a fixed read-out."""
    rng = np.random.default_rng(seed)
    specs = [zoo.MemberSpec(seed=i, lr=float(10 ** rng.uniform(-3.3, -1.3)), dropout=float(rng.uniform(0, 0.7)),
                            train_fraction=float(rng.choice([0.1, 0.25, 0.5, 1.0]))) for i in range(members)]
    P = SMALLCNN.layout().n_params
    readout, drift = rng.standard_normal(P) / np.sqrt(P), 0.02 * rng.standard_normal(P)
    w = ZooWriter.create(path, SMALLCNN, specs, list(range(checkpoints)), ["test_loss", "test_acc", "train_acc"],
                         dataset="mnist", config="{}")
    ids = np.arange(members)
    with w:
        for c in range(checkpoints):
            W = (0.1 * rng.standard_normal((members, P)) + c * drift).astype(np.float32)  # (M, P)
            acc = 1 / (1 + np.exp(-(W @ readout) * 10 - rng.normal(0, 0.3, members)))
            w.write(ids, c, W, {"test_loss": -np.log(acc), "test_acc": acc,
                              "train_acc": acc + rng.normal(0, 0.01, members)})
        w.done(ids)
    w.commit()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=10000)
    ap.add_argument("--checkpoints", type=int, default=4)
    ap.add_argument("--targets", nargs="+", default=["test_acc", "epoch", "gen_gap", "lr", "dropout", "train_fraction"])
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.h5"
        t0 = time.perf_counter()
        write_zoo(path, a.members, a.checkpoints)
        t1 = time.perf_counter()
        data = load_probe_data([str(path)])
        t2 = time.perf_counter()
        results, _, _ = evaluate_probes(data, a.targets, n_boot=100, progress=True, device=a.device,
                                        regress=("train_fraction",))
        t3 = time.perf_counter()
    print(results.pivot(index="target", columns="column", values="r2").round(3).to_string())
    print(f"{a.members} members x {a.checkpoints} checkpoints ({len(data.rows)} rows, {data.W.shape[1]} weights): "
          f"write {t1 - t0:.1f} s, load {t2 - t1:.1f} s, probes {t3 - t2:.1f} s ({len(results)} cells)")


if __name__ == "__main__":
    main()
