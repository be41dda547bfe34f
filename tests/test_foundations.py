"""The shared pieces every stage builds on: specs and layouts, the engine's rules, the batched evaluator,
the zoo writer, the output lock."""
import json
import multiprocessing as mp

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
from test_models import SHAPES, input_shape

import zoo
from zoo import Layout, ModelSpec, UsageError, ZooWriter
from zoo.engine import BatchedNet, missing_rules
from zoo.io import output_lock
from zoo.models import flatten_state, init_weights, list_models
from zoo.solo import accuracy
from zoo.store import table_build_id


def _spec(name):
    c, s = SHAPES[name]
    kw = {"patch": 4} if name == "vit_t" and s % 7 else {}
    return ModelSpec(name, kw, input_shape(name), 10)


@pytest.mark.parametrize("name", list_models())
def test_every_layer_type_of_every_architecture_has_an_engine_rule(name):
    assert missing_rules(_spec(name).create()) == []


def test_an_unknown_layer_type_fails_when_the_engine_is_built(monkeypatch):
    class Odd(nn.Module):
        def forward(self, x):
            return x

    odd_net = lambda self, *a, **k: nn.Sequential(nn.Flatten(), Odd(), nn.Linear(64, 10))
    monkeypatch.setattr(ModelSpec, "create", odd_net)
    with pytest.raises(UsageError, match="no rule for: Odd"):
        BatchedNet(ModelSpec("mlp", {}, (1, 8, 8), 10), ["relu"])


@pytest.mark.parametrize("name", list_models())
def test_layout_round_trips_and_indexes_tensors(name):
    net = _spec(name).create()
    layout = Layout.of(net)
    assert Layout.from_json(layout.to_json()) == layout
    assert [e.name for e in layout] == list(net.state_dict()) and layout.n_params == flatten_state(net).numel()
    flat = torch.randn(3, layout.n_params)
    state = layout.unflatten(flat)
    assert torch.equal(layout.flatten(state), flat)
    e = layout[-1]
    assert torch.equal(layout.tensor(flat, e.name), flat[:, e.slice].reshape(3, *e.shape))
    assert torch.equal(layout.views(flat)[0], state[layout[0].name])


def test_layout_entries_must_be_contiguous():
    with pytest.raises(ValueError, match="starts at 5, expected 4"):
        Layout.from_json([{"name": "a", "shape": [2, 2], "offset": 0}, {"name": "b", "shape": [3], "offset": 5}])
    with pytest.raises(KeyError, match="no tensor 'c'"):
        Layout.from_json([{"name": "a", "shape": [2], "offset": 0}])["c"]


def test_model_spec_round_trips_through_zoo_attributes(tiny_zoo):
    spec = ModelSpec("vit_t", {"patch": 4, "dim": 16}, (1, 8, 8), 7)
    assert ModelSpec.from_attrs(spec.to_attrs()) == spec and hash(ModelSpec.from_attrs(spec.to_attrs())) == hash(spec)
    with zoo.open(tiny_zoo) as z:
        assert z.spec == ModelSpec("cnn_gap", {}, (1, 8, 8), 10) and z.layout == z.spec.layout()
    with pytest.raises(UsageError, match="images are 8x9"):
        ModelSpec("mlp", {}, (1, 8, 9), 10)


def test_zoo_offers_what_readers_took_raw(tiny_zoo):
    with zoo.open(tiny_zoo) as z, h5py.File(tiny_zoo) as f:
        assert np.array_equal(z.done, f["models/done"][:]) and np.array_equal(z.diverged, f["models/diverged"][:])
        assert z.usable().all() and set(z.metric_names) >= {"test_acc", "train_loss"}
        assert z.activations() == list(f["models/activation"].asstr()[:])
        assert z.members()[5] == z.hparams(5)
        rows = z.weight_rows([4, 1, 3], 1)
        assert np.array_equal(rows, np.stack([z.weights(m, 1) for m in (4, 1, 3)]))
        with pytest.raises(UsageError, match="no metric 'val_acc'"):
            z.metric("val_acc")


def test_batched_evaluator_reproduces_each_plain_model(tiny_zoo):
    with zoo.open(tiny_zoo) as z:
        data = z.dataset()
        members = [9, 0, 14, 3, 6]  # activations unsorted: the evaluator groups them
        W = z.weight_rows(members, 2)
        W[3] = np.nan  # a diverged row
        out = zoo.evaluate(z.spec, W, data, [z.activations()[m] for m in members], predictions=True, batch_members=2)
        for i, m in enumerate(members):
            if i == 3:
                assert np.isnan(out["test_acc"][i]) and (out["test_pred"][i] == -1).all()
                continue
            assert out["test_acc"][i] == pytest.approx(accuracy(z.model(m, 2), data), abs=1e-6)
            assert out["test_acc"][i] == pytest.approx(float(z.metric("test_acc")[m, 2]), abs=1e-6)
            with torch.no_grad():
                pred = z.model(m, 2)(data.normalize(data.x_test)).argmax(1).numpy()
            assert np.array_equal(out["test_pred"][i], pred)
    with pytest.raises(UsageError, match=r"weights must be \(members, 4970\)"):
        zoo.evaluate(z.spec, np.zeros((2, 5)), data, ["relu", "relu"])


def _write_zoo(out, n=3, fields=None):
    spec = ModelSpec("mlp", {"widths": [4]}, (1, 8, 8), 10)
    members = [zoo.MemberSpec(seed=i, activation="relu") for i in range(n)]
    w = ZooWriter.create(out, spec, members, [0, 1], ["test_loss", "test_acc"], dataset="digits", config="name: t\n",
                         fields=fields)
    P = spec.layout().n_params
    with w:
        for slot in (0, 1):
            w.write(np.arange(n), slot, np.full((n, P), slot, np.float32),
                    {"test_acc": np.full(n, 0.5), "test_loss": np.array([1.0] * (n - 1) + [np.nan])})
        w.done(np.arange(n))
    return w, spec


def test_writer_lays_out_writes_and_commits_once(tmp_path):
    out = tmp_path / "w.h5"
    w, spec = _write_zoo(out, fields={"source": ["a", "b", "c"]})
    assert not out.exists() and w.partial.exists()
    assert w.commit() == out and not w.partial.exists()
    with zoo.open(out) as z:
        assert z.spec == spec and z.n_models == 3 and z.field("source").tolist() == ["a", "b", "c"]
        assert z.file["weights"][2, 1].min() == 1 and z.file["metrics/test_acc"].attrs["description"]
        assert table_build_id(out.with_suffix(".parquet")) == z.build_id != ""
        t = z.table
    assert t.column("source").to_pylist()[:2] == ["a", "a"]
    assert t.column("test_loss").null_count == 2  # NaN (not reached) is null in Parquet


def test_writer_takes_members_in_any_order(tmp_path):
    spec = ModelSpec("mlp", {"widths": [4]}, (1, 8, 8), 10)
    w = ZooWriter.create(tmp_path / "w.h5", spec, [zoo.MemberSpec(seed=i) for i in range(3)], [0],
                         ["test_loss", "test_acc"], dataset="digits", config="{}")
    ids, P = np.array([2, 0, 1]), spec.layout().n_params  # a population's layout order, not id order
    w.write(ids, 0, ids[:, None] * np.ones((3, P), np.float32), {"test_acc": ids / 10, "test_loss": ids * 1.0})
    w.done(ids, np.array([True, False, False]))
    with zoo.open(w.commit()) as z:
        assert [z.weights(i, 0)[0] for i in range(3)] == [0, 1, 2]
        assert np.allclose(z.metric("test_acc")[:, 0], [0, 0.1, 0.2]) and z.field("diverged").tolist() == [0, 0, 1]


def test_a_stale_parquet_table_is_never_paired_with_the_zoo(tmp_path):
    out = tmp_path / "w.h5"
    _write_zoo(out)[0].commit()
    stale = pq.read_table(out.with_suffix(".parquet"))
    out.unlink()
    _write_zoo(out, n=4)[0].commit(table=False)  # as if killed between the HDF5 rename and the table
    pq.write_table(stale, out.with_suffix(".parquet"))
    with zoo.open(out) as z:
        assert z.table.num_rows == 8  # derived anew from the HDF5 file, not the old table's 6 rows


def test_commit_refuses_members_not_done(tmp_path):
    spec = ModelSpec("mlp", {"widths": [4]}, (1, 8, 8), 10)
    w = ZooWriter.create(tmp_path / "w.h5", spec, [zoo.MemberSpec(seed=i) for i in range(2)], [0],
                         ["test_loss", "test_acc"], dataset="digits", config="{}")
    w.done([0])
    with pytest.raises(UsageError, match="1 members not done"):
        w.commit()
    assert not (tmp_path / "w.h5").exists()


def _hold_lock(path, ready, release):
    with output_lock(path):
        ready.set()
        release.wait(10)


def test_output_lock_is_exclusive_and_names_the_owner(tmp_path):
    out = tmp_path / "z.h5"
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(out, ready, release))
    p.start()
    try:
        assert ready.wait(30)
        with pytest.raises(UsageError, match=rf"being written by another process \(pid {p.pid}\)"):
            with output_lock(out):
                pass
    finally:
        release.set()
        p.join(10)
    with output_lock(out):  # free again once the owner is gone
        pass
    assert not (tmp_path / "z.h5.lock").exists()


def test_init_weights_in_the_new_layout_equals_flatten_state():
    net = init_weights(_spec("cnn_s").create(), "orthogonal", 1.0, torch.Generator().manual_seed(0))
    assert json.loads(Layout.of(net).to_json())[0] == {"name": "0.weight", "shape": [8, 1, 5, 5], "offset": 0}


def test_weight_items_read_pairs_in_order_dense_or_sparse(tmp_path):
    spec = ModelSpec("mlp", {"widths": [4]}, (1, 8, 8), 10)
    n, slots = 12, [0, 1, 2]
    w = ZooWriter.create(tmp_path / "w.h5", spec, [zoo.MemberSpec(seed=i) for i in range(n)], slots,
                         ["test_loss", "test_acc"], dataset="digits", config="name: t\n")
    P = spec.layout().n_params
    with w:
        for s in slots:  # entry j of member m at slot s: m * 100 + s * 10 + j % 7, unique per (m, s)
            w.write(np.arange(n), s, (np.arange(n)[:, None] * 100 + s * 10 + np.arange(P)[None] % 7).astype(np.float32),
                    {"test_acc": np.full(n, 0.5), "test_loss": np.ones(n)})
        w.done(np.arange(n))
    w.commit()
    rng = np.random.default_rng(0)
    with zoo.open(tmp_path / "w.h5") as z:
        cases = [(np.repeat(np.arange(n), 3), np.tile(slots, n)),  # every pair: dense boxes
                 (rng.integers(0, n, 40), rng.integers(-3, 3, 40)),  # repeats, negative slots
                 (np.array([11, 0, 5]), np.array([2, 0, -1]))]  # sparse: one read per pair
        for members, ss in cases:
            for block in (4, 256):
                got = z.weight_items(members, ss, block=block)
                want = np.stack([z.weights(m, s) for m, s in zip(members, ss)])
                assert np.array_equal(got, want), (members, ss, block)
        assert z.weight_items([], []).shape == (0, P)
