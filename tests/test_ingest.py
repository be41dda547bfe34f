"""The field's zoos in: Small CNN Zoo and Model Zoos directories, written here in their formats from members
trained by the test, imported back and checked against the accuracy they recorded."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config

import zoo
from zoo.build import build
from zoo.cli import run_cli
from zoo.ingest import main as ingest_main
from zoo.ingest import nfn_split

KERAS_INIT = {"kaiming_uniform": "he_uniform", "xavier_uniform": "glorot_uniform", "orthogonal": "orthogonal"}


@pytest.fixture(scope="module")
def smallcnn_zoo(tmp_path_factory):
    cfg = tiny_config("architecture=smallcnn", "input_scaling=minus_one_one", "resize=28", "epochs=1",
                      "checkpoints=[0,1]", "grid.init=[kaiming_uniform,xavier_uniform]", "grid.dropout=[0.0]")
    return build(cfg, tmp_path_factory.mktemp("scz") / "src.h5", progress=False)


def write_small_cnn_zoo(z: zoo.Zoo, root, transpose=True):
    """The zoo's members in Unterthiner et al.'s files: Keras-ordered rows, one metrics row each, layout.csv."""
    root.mkdir(parents=True, exist_ok=True)
    layout_rows, rows, metrics, start = [], [], [], 0
    for e in z.layout:
        shape = (*e.shape[2:], e.shape[1], e.shape[0]) if len(e.shape) == 4 else tuple(reversed(e.shape))
        kind = "kernel" if e.kind == "weight" else "bias"
        layout_rows.append({"varname": f"layer{len(layout_rows) // 2}/{kind}:0", "start_idx": start,
                            "end_idx": start + e.size, "size": e.size, "shape": str(shape)})
        start += e.size
    hp = z.members()
    for m in range(z.n_models):
        for k, epoch in enumerate(z.epochs):
            state = z.state_dict(m, k)
            parts = []
            for e in z.layout:
                t = state[e.name].numpy()
                if transpose:
                    t = t.transpose(2, 3, 1, 0) if t.ndim == 4 else t.T
                parts.append(t.reshape(-1))
            rows.append(np.concatenate(parts))
            metrics.append({"modeldir": f"run/{m:04d}", "step": int(epoch), "config.activation": hp[m].activation,
                            "config.w_init": KERAS_INIT[hp[m].init], "config.init_std": hp[m].init_scale,
                            "config.optimizer": hp[m].optimizer, "config.learning_rate": hp[m].lr,
                            "config.l2reg": hp[m].weight_decay / 2, "config.dropout": hp[m].dropout,
                            "config.train_fraction": 1.0, "config.random_seed": hp[m].seed,
                            "test_accuracy": float(z.metric("test_acc")[m, k]),
                            "test_loss": float(z.metric("test_loss")[m, k]),
                            "train_accuracy": float(z.metric("train_acc")[m, k]),
                            "train_loss": float(z.metric("train_loss")[m, k])})
    np.save(root / "weights.npy", np.stack(rows).astype(np.float32))
    pd.DataFrame(metrics).to_csv(root / "metrics.csv.gz", index=False, compression="gzip")
    pd.DataFrame(layout_rows).to_csv(root / "layout.csv", index=False)
    return root


def test_small_cnn_zoo_imports_and_reproduces_recorded_accuracy(smallcnn_zoo, tmp_path, capsys):
    with zoo.open(smallcnn_zoo) as src:
        root = write_small_cnn_zoo(src, tmp_path / "scz")
        out = tmp_path / "imported.h5"
        argv = ["small-cnn-zoo", str(root), "--out", str(out), "--dataset", "digits", "--resize", "28", "--quiet"]
        assert run_cli(ingest_main, argv) == 0
        assert "reproduce their recorded test accuracy within 0.0000" in capsys.readouterr().out
        with zoo.open(out) as z:
            assert z.architecture == "smallcnn" and z.n_models == src.n_models and list(z.epochs) == [0, 1]
            assert np.array_equal(z.file["weights"][:], src.file["weights"][:])  # HWIO -> OIHW exactly
            assert z.hparams(3).init == src.hparams(3).init and z.field("source_w_init")[3] in KERAS_INIT.values()
            assert z.hparams(5).weight_decay == pytest.approx(src.hparams(5).weight_decay)
            assert z.config["input_scaling"] == "minus_one_one"
            data = z.dataset()
            from zoo.solo import accuracy
            assert accuracy(z.model(2, 1), data) == pytest.approx(float(z.metric("test_acc")[2, 1]), abs=1e-6)


def test_a_wrong_layout_fails_the_fidelity_check(smallcnn_zoo, tmp_path, capsys):
    with zoo.open(smallcnn_zoo) as src:
        root = write_small_cnn_zoo(src, tmp_path / "scz", transpose=False)  # torch order labelled as Keras
    out = tmp_path / "bad.h5"
    argv = ["small-cnn-zoo", str(root), "--out", str(out), "--dataset", "digits", "--resize", "28"]
    assert run_cli(ingest_main, argv) == 2
    err = capsys.readouterr().err
    assert "do not reproduce their recorded test accuracy" in err and err.count("\n") == 1 and not out.exists()


def test_nfn_split_of_the_imported_zoo(smallcnn_zoo, tmp_path):
    with zoo.open(smallcnn_zoo) as src:
        root = write_small_cnn_zoo(src, tmp_path / "scz")
    metrics = pd.read_csv(root / "metrics.csv.gz")
    shuffled = np.random.default_rng(0).permutation(len(metrics))
    pd.DataFrame(shuffled).to_csv(tmp_path / "split.csv", header=False, index=False)
    out = tmp_path / "imported.h5"
    assert run_cli(ingest_main, ["small-cnn-zoo", str(root), "--out", str(out), "--dataset", "digits", "--resize",
                                 "28", "--check", "0", "--nfn-split", str(tmp_path / "split.csv"), "--quiet"]) == 0
    split = json.loads(out.with_suffix(".nfn_split.json").read_text())
    n = len(metrics) // 2  # final-step rows: one per member
    assert len(split["test_members"]) == n - n // 2 and sorted(sum(split.values(), [])) == list(range(n))
    direct = nfn_split(metrics, shuffled, [f"run/{m:04d}" for m in range(n)])
    assert direct == split
    from probes.evaluate import main as probes_main
    assert run_cli(probes_main, ["--zoo", str(out), "--split", str(out.with_suffix(".nfn_split.json")),
                                 "--out", str(tmp_path / "p"), "--targets", "test_acc", "--bootstrap", "5",
                                 "--quiet"]) == 0
    used = json.loads((tmp_path / "p" / "split.json").read_text())["test_members"]
    assert used == sorted(split["test_members"])


@pytest.fixture(scope="module")
def cnn_s_zoo(tmp_path_factory):
    cfg = tiny_config("architecture=cnn_s", "resize=28", "epochs=1", "checkpoints=[0,1]", "grid.dropout=[0.0]")
    return build(cfg, tmp_path_factory.mktemp("mz") / "src.h5", progress=False)


def write_model_zoos(z: zoo.Zoo, root, payload=None):
    """The zoo's members as Ray Tune trial folders of the Model Zoos."""
    for m in range(z.n_models):
        hp = z.hparams(m)
        trial = root / f"NN_tune_trainable_{m:05d}_seed={hp.seed}"
        trial.mkdir(parents=True)
        (trial / "params.json").write_text(json.dumps({
            "model::type": "CNN", "model::channels_in": 1, "model::o_dim": 10, "model::nlin": hp.activation,
            "model::dropout": hp.dropout, "model::init_type": hp.init, "optim::optimizer": hp.optimizer,
            "optim::lr": hp.lr, "optim::wd": hp.weight_decay, "seed": hp.seed, "training::batchsize": hp.batch_size}))
        lines = []
        for k, epoch in enumerate(z.epochs):
            state = {f"module_list.{i}.{e.kind}": t for i, (e, t) in
                     enumerate(zip(z.layout, z.state_dict(m, k).values()))}
            (trial / f"checkpoint_{epoch:06d}").mkdir()
            torch.save(payload if payload is not None else state, trial / f"checkpoint_{epoch:06d}" / "checkpoints")
            lines.append(json.dumps({"training_iteration": int(epoch), "test_acc": float(z.metric("test_acc")[m, k]),
                                     "loss_test": float(z.metric("test_loss")[m, k]),
                                     "train_acc": float(z.metric("train_acc")[m, k])}))
        (trial / "result.json").write_text("\n".join(lines) + "\n")
    return root


def test_model_zoos_trials_import_with_weights_only_loads(cnn_s_zoo, tmp_path, capsys):
    with zoo.open(cnn_s_zoo) as src:
        root = write_model_zoos(src, tmp_path / "mz")
        out = tmp_path / "imported.h5"
        assert run_cli(ingest_main, ["model-zoos", str(root), "--out", str(out), "--dataset", "digits",
                                     "--resize", "28", "--quiet"]) == 0
        assert "reproduce their recorded test accuracy" in capsys.readouterr().out
        with zoo.open(out) as z:
            order = [int(t.split("_")[3]) for t in z.field("source_trial")]
            assert z.architecture == "cnn_s" and np.array_equal(z.file["weights"][:], src.file["weights"][order])
            assert [z.hparams(i).lr for i in range(z.n_models)] == [src.hparams(m).lr for m in order]
            assert "train_loss" not in z.metric_names and "train_acc" in z.metric_names


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_a_model_zoos_checkpoint_with_code_is_refused(cnn_s_zoo, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "PWNED"
    with zoo.open(cnn_s_zoo) as src:
        root = write_model_zoos(src, tmp_path / "mz", payload={"w": _Payload(marker)})
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert run_cli(ingest_main, ["model-zoos", str(root), "--out", str(tmp_path / "o.h5"), "--dataset",
                                 "digits", "--resize", "28"]) == 2
    err = capsys.readouterr().err
    assert "is not a readable Model Zoos checkpoint" in err and "weights_only=False" not in err
    assert not marker.exists() and not (tmp_path / "o.h5").exists()


@pytest.mark.parametrize("argv,message", [
    (["small-cnn-zoo", "{tmp}/missing", "--out", "{tmp}/o.h5"], "is not a directory"),
    (["small-cnn-zoo", "{tmp}", "--out", "{tmp}/o.h5"], "weights.npy is missing"),
    (["model-zoos", "{tmp}", "--out", "{tmp}/o.h5"], "holds no Ray Tune trial folders"),
    (["model-zoos", "{tmp}", "--out", "{tmp}/o.txt"], "must end in .h5"),
])
def test_bad_sources_are_one_line(argv, message, tmp_path, capsys):
    assert run_cli(ingest_main, [a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
