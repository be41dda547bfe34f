import dataclasses
import json
import re
import subprocess
import sys

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import TINY, tiny_config

import zoo
import zoo.join
from zoo.build import build, main, run_order, shard_ids
from zoo.cli import run_cli
from zoo.config import HPARAMS, MemberSpec, expand_members
from zoo.join import _copy_weights
from zoo.population import Population
from zoo.solo import accuracy
from zoo.store import table_from_h5


def test_zoo_file_follows_the_contract(tiny_zoo):
    with h5py.File(tiny_zoo) as f:
        w = f["weights"]
        assert w.dtype == np.float32 and w.shape == (16, 3, 4970) and w.chunks == (1, 1, 4970)
        assert w.compression == "gzip"
        assert f["checkpoints/epoch"].dtype == np.int32 and f["checkpoints/epoch"][:].tolist() == [0, 1, 2]
        for name in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert f[f"metrics/{name}"].dtype == np.float32 and f[f"metrics/{name}"].shape == (16, 3)
        assert f["models/done"][:].all() and f["models/diverged"].dtype == bool
        for hp in HPARAMS:
            assert len(f[f"models/{hp}"]) == 16, hp
        assert f["models/activation"].asstr()[:].tolist().count("tanh") == 8
        a = f.attrs
        assert a["format"] == "weightzoo-zoo/1" and a["architecture"] == "cnn_gap" and a["dataset"] == "digits"
        assert json.loads(a["input_shape"]) == [1, 8, 8] and a["num_classes"] == 10 and a["version"] == zoo.__version__
        assert yaml.safe_load(a["config"])["epochs"] == 2 and json.loads(a["architecture_kwargs"]) == {}
        layout = json.loads(a["layout"])
        assert layout[0] == {"name": "0.weight", "shape": [16, 1, 3, 3], "offset": 0}
        assert not np.isnan(f["metrics/test_acc"][:]).any()


def test_parquet_table_is_derived_from_h5(tiny_zoo):
    table = pq.read_table(tiny_zoo.with_suffix(".parquet"))
    assert table.num_rows == 16 * 3
    for col in ["model_id", "checkpoint", "epoch", *HPARAMS, "train_loss", "test_acc", "diverged", "dataset",
                "architecture"]:
        assert col in table.column_names, col
    with h5py.File(tiny_zoo) as f:
        assert table.equals(table_from_h5(f))
    df = table.to_pandas()
    assert df.groupby("model_id").size().eq(3).all() and set(df.epoch) == {0, 1, 2}


def test_loaded_members_reproduce_recorded_accuracy(tiny_zoo):
    with zoo.open(tiny_zoo) as z:
        data = z.dataset()
        recorded = z.metric("test_acc")
        for member, ckpt in [(0, 0), (5, 1), (15, 2), (9, -1)]:
            assert accuracy(z.model(member, ckpt), data) == pytest.approx(float(recorded[member, ckpt]), abs=1e-6)
        assert z.hparams(3).seed == 3 and z.state_dict(3, 0)["0.weight"].shape == (16, 1, 3, 3)


def _read_all(path):
    with h5py.File(path) as f:
        return f["weights"][:], {k: f[f"metrics/{k}"][:] for k in f["metrics"]}


def test_resume_after_interruption_is_bitwise_identical(tmp_path):
    cfg = tiny_config("population_size=3")  # 16 members -> 8 populations
    full = build(cfg, tmp_path / "full.h5", progress=False)
    out = tmp_path / "resumed.h5"
    assert build(cfg, out, max_populations=3, progress=False) is None
    assert not out.exists() and out.with_name("resumed.h5.partial").exists()
    with h5py.File(out.with_name("resumed.h5.partial")) as f:
        assert 0 < f["models/done"][:].sum() < 16
    assert build(cfg, out, progress=False) == out
    (w1, m1), (w2, m2) = _read_all(full), _read_all(out)
    assert np.array_equal(w1, w2) and all(np.array_equal(m1[k], m2[k]) for k in m1)


def test_resume_on_another_device_and_merge_of_per_device_shards_are_allowed(tmp_path):
    cfg = tiny_config("population_size=8")
    out = tmp_path / "z.h5"
    assert build(cfg, out, max_populations=1, progress=False) is None
    assert build(tiny_config("population_size=8", "device=cpu"), out, progress=False) == out  # was device=auto
    shards = [build(tiny_config(f"device={d}"), tmp_path / f"s{i}.h5", shard=(i, 2), progress=False)
              for i, d in enumerate(["auto", "cpu"])]
    assert zoo.join.main([str(tmp_path / "m.h5"), *map(str, shards)]) is None


def test_partial_of_another_config_is_refused(tmp_path):
    out = tmp_path / "z.h5"
    build(tiny_config("population_size=3"), out, max_populations=1, progress=False)
    with pytest.raises(zoo.UsageError, match="another config"):
        build(tiny_config("population_size=3", "epochs=1", "checkpoints=[0,1]"), out, progress=False)


def test_partial_of_a_shard_with_other_members_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "s0.h5"
    monkeypatch.setattr(zoo.build, "shard_ids", lambda members, i, n: np.arange(len(members))[i::n])  # old layout
    build(tiny_config("population_size=3"), out, shard=(0, 2), max_populations=1, progress=False)
    monkeypatch.undo()
    with pytest.raises(zoo.UsageError, match="another config or shard"):
        build(tiny_config("population_size=3"), out, shard=(0, 2), progress=False)


def test_shards_are_equal_pieces_of_the_population_order_with_few_slices():
    grid = [(a, o) for a in ("gelu", "relu", "sigmoid", "tanh") for o in ("adam", "sgd")] * 10  # ids interleave
    members = [MemberSpec(seed=j, activation=a, optimizer=o) for j, (a, o) in enumerate(grid)]
    order = run_order(members, range(80))
    for n in (1, 2, 3, 5):
        shards = [shard_ids(members, i, n) for i in range(n)]
        assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(80))  # a partition of the members
        assert {len(s) for s in shards} <= {80 // n, -(-80 // n)}  # equal up to one member
        for s in shards:  # a contiguous piece of the layout order: at most ceil(8 / n) + 1 of its 8 slices
            k = order.index(run_order(members, s)[0])
            assert run_order(members, s) == order[k:k + len(s)]
            assert len({(members[j].activation, members[j].optimizer) for j in s}) <= -(-8 // n) + 1
    assert {members[j].activation for j in shard_ids(members, 0, 2)} == {"gelu", "relu"}


def test_shards_merge_into_the_full_zoo(tmp_path, tiny_zoo):
    shards = [tmp_path / f"s{i}.h5" for i in range(3)]
    for i, s in enumerate(shards):
        assert run_cli(main, TINY + ["--out", str(s), "--shard", f"{i}/3", "--quiet"]) == 0
    assert run_cli(zoo.join.main, [str(tmp_path / "m.h5"), *map(str, shards)]) == 0
    (w1, m1), (w2, m2) = _read_all(tiny_zoo), _read_all(tmp_path / "m.h5")
    # shards hold other population mates than the full build: batched kernels round differently (~1e-5)
    assert np.allclose(w1, w2, rtol=0, atol=1e-4) and np.allclose(m1["test_acc"], m2["test_acc"], atol=1e-3)
    assert pq.read_table(tmp_path / "m.parquet").num_rows == 48
    members = expand_members(tiny_config())
    for i, s in enumerate(shards):  # each shard is its piece of the members, copied bit for bit (stored chunks)
        ids = shard_ids(members, i, 3)
        with h5py.File(s) as f:
            assert np.array_equal(np.flatnonzero(f["models/done"][:]), ids)
        ws, ms = _read_all(s)
        assert np.array_equal(w2[ids], ws[ids]) and np.array_equal(m2["test_acc"][ids], ms["test_acc"][ids])
    assert run_cli(zoo.join.main, [str(tmp_path / "m2.h5"), str(shards[0])]) == 2  # incomplete


def test_consuming_merge_equals_copying_merge(tmp_path):
    shards = [build(tiny_config(), tmp_path / f"s{i}.h5", shard=(i, 2), progress=False, table=False) for i in range(2)]
    assert not (tmp_path / "s0.parquet").exists()
    kept = zoo.join.join(tmp_path / "kept.h5", shards)
    assert all(p.exists() for p in shards)
    consumed = zoo.join.join(tmp_path / "consumed.h5", shards, consume=True)
    assert not shards[0].exists() and shards[1].exists()  # shard 0's file became the zoo
    (w1, m1), (w2, m2) = _read_all(kept), _read_all(consumed)
    assert np.array_equal(w1, w2, equal_nan=True) and all(np.array_equal(m1[k], m2[k]) for k in m1)
    with h5py.File(kept) as a, h5py.File(consumed) as b:
        assert dict(a.attrs) == dict(b.attrs) and "shard" not in b.attrs and b["models/done"][:].all()
    assert pq.read_table(kept.with_suffix(".parquet")).equals(pq.read_table(consumed.with_suffix(".parquet")))


def test_failed_consuming_merge_gives_the_first_shard_back(tmp_path, monkeypatch):
    shards = [build(tiny_config(), tmp_path / f"s{i}.h5", shard=(i, 2), progress=False, table=False) for i in range(2)]
    def fail(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(zoo.join, "_copy_members", fail)
    with pytest.raises(OSError, match="disk full"):
        zoo.join.join(tmp_path / "z.h5", shards, consume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0.h5", "s1.h5"]
    monkeypatch.undo()
    assert zoo.join.join(tmp_path / "z.h5", shards, consume=True).exists()  # the rerun merges


@pytest.mark.parametrize("same_layout", [True, False])
def test_weight_rows_copy_as_stored_or_row_by_row(tmp_path, same_layout):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 3, 50)).astype("f4")
    with h5py.File(tmp_path / "a.h5", "w") as f:
        kw = dict(chunks=(1, 1, 50), compression="gzip", compression_opts=4, shuffle=True, fillvalue=np.nan)
        src = f.create_dataset("src", w.shape, "f4", **kw)
        src[[1, 4]] = w[[1, 4]]
        src[2, 0] = w[2, 0]  # a member with one checkpoint written (not in ids: must not travel)
        dst = f.create_dataset("dst", w.shape, "f4", **(kw if same_layout else dict(chunks=(1, 3, 50),
                                                                                    fillvalue=np.nan)))
        dst[0] = w[0]
        _copy_weights(src, dst, np.array([1, 4]))
        out = dst[:]
    assert np.array_equal(out[[0, 1, 4]], w[[0, 1, 4]]) and np.isnan(out[[2, 3, 5]]).all()


def test_pruned_zoo_records_sparsity(tmp_path):
    out = build(tiny_config("fixed.prune_fraction=0.6", "prune_epochs=[1,2]"), tmp_path / "p.h5", progress=False)
    with zoo.open(out) as z:
        sp = z.metric("sparsity")
        assert np.allclose(sp[:, 2], 0.6, atol=2e-3) and np.allclose(sp[:, 1], 0.3, atol=2e-3)
        assert (z.weights(0, 2) == 0).mean() > 0.55


BAD_INPUTS = [
    (["epoch=3"], "unknown config key 'epoch'"),
    (["architecture=resnet9"], "unknown architecture 'resnet9'"),
    (["dataset=mnist", "data_root=/nonexistent"], "/nonexistent/mnist/train-images-idx3-ubyte"),
    (["architecture=cnn_s"], "cannot take input shape (1, 8, 8)"),
    (["--shard", "3/2"], "--shard must be i/n"),
    (["--config", "configs/zoo/nope.yaml"], "config file configs/zoo/nope.yaml does not exist"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS)
def test_bad_input_is_one_clear_line(argv, message, tmp_path, capsys):
    out = tmp_path / "z.h5"
    assert run_cli(main, argv + ["--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_existing_zoo_is_not_overwritten(tiny_zoo, capsys):
    before = tiny_zoo.read_bytes()
    assert run_cli(main, TINY + ["--out", str(tiny_zoo), "--quiet"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert tiny_zoo.read_bytes() == before


def test_overwrite_replaces(tmp_path):
    out = tmp_path / "z.h5"
    assert run_cli(main, TINY + ["--out", str(out), "--quiet", "epochs=1", "checkpoints=[0,1]"]) == 0
    assert run_cli(main, TINY + ["--out", str(out), "--quiet", "--overwrite"]) == 0
    with zoo.open(out) as z:
        assert z.n_checkpoints == 3


def test_command_line_exit_code_and_no_traceback():
    r = subprocess.run([sys.executable, "-m", "zoo.build", "lr=0.1"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    valid = ", ".join(sorted(f.name for f in dataclasses.fields(zoo.ZooConfig)))
    assert r.stderr.strip() == f"error: unknown config key 'lr' in override 'lr=0.1'; valid keys: {valid}"


def test_torchrun_splits_members_across_ranks_and_merges(tmp_path, tiny_zoo):
    out = tmp_path / "z.h5"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "zoo.build",
           *TINY, "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["z.h5", "z.parquet"]  # shard files merged and removed
    (w1, m1), (w2, m2) = _read_all(tiny_zoo), _read_all(out)
    # shards hold other population mates than the full build: batched kernels round differently (~1e-5)
    assert np.allclose(w1, w2, rtol=0, atol=1e-4) and np.allclose(m1["test_acc"], m2["test_acc"], atol=1e-3)


def test_summary_splits_time_into_phases(tmp_path, capsys):
    assert run_cli(main, TINY + ["--out", str(tmp_path / "z.h5"), "--quiet", "population_size=8"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("trained 16 members"))
    num = lambda key: float(re.search(rf"{key} ([0-9.]+) s", line).group(1))
    total = float(re.search(r"epochs in ([0-9.]+) s", line).group(1))
    parts = [num("population setup"), num("train"), num("evaluate"), num("checkpoint handoff"), num("final write")]
    assert num("of which epoch 1") <= num("train") and num("of which epoch 0") <= num("evaluate")
    assert abs(sum(parts) - total) <= 0.3  # the phases cover the build's time (each printed to 0.05 s)


def test_data_orders_share_the_init_and_not_the_order(digits):
    members = expand_members(tiny_config("data_orders=2", "seeds=2"))
    assert len(members) == 2 * len(expand_members(tiny_config("seeds=2")))
    a, b = members[0], members[1]  # consecutive: one seed, two data orders
    assert a.seed == b.seed and a.data_seed == -1 and b.order_seed != a.order_seed
    assert len({m.order_seed for m in members}) == len(members)  # every member its own data order
    pop = Population("cnn_gap", {}, [a, b], digits)
    start = pop.flat_weights().clone()
    assert torch.equal(start[0], start[1])
    assert not torch.equal(pop.epoch_order(1)[0], pop.epoch_order(1)[1])
    pop.train_epoch(1, max_steps=4)
    assert not torch.equal(pop.flat_weights()[0], pop.flat_weights()[1])


def test_populations_are_laid_out_in_activation_runs(tmp_path, monkeypatch):
    """A random zoo draws activations in any order; each population trains them as one slice each."""
    import zoo.build as zb
    seen = []
    real = zb.Population

    def spy(*args, **kw):
        pop = real(*args, **kw)
        seen.append(len(pop.act_runs))
        return pop
    monkeypatch.setattr(zb, "Population", spy)
    cfg = tiny_config("n_random=12", "epochs=1", "checkpoints=[0,1]", "grid={}",
                      "random={activation: {choice: [tanh, relu]}, lr: {log_uniform: [0.001, 0.01]}}")
    acts = [m.activation for m in expand_members(cfg)]
    assert sum(a != b for a, b in zip(acts, acts[1:])) > 2  # drawn interleaved
    out = build(cfg, tmp_path / "r.h5", progress=False)
    assert seen and all(n <= 2 for n in seen)
    with zoo.open(out) as z:
        assert z.activations() == acts and z.usable().all()
