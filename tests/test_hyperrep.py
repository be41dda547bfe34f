import os

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from test_models import KWARGS, SHAPES, input_shape, sample_input

import zoo
from hyperrep import FitConfig, Tokenizer, embed_zoo, fit_run, load_run, nt_xent, split_members
from hyperrep.data import layer_stats
from hyperrep.fit import main as fit_main
from zoo import Layout, Permuter, find_couplings
from zoo.cli import load_config, run_cli
from zoo.models import flatten_state, init_weights, list_models

os.environ["WEIGHTZOO_QUIET"] = "1"
TINY_FIT = ["epochs=3", "d_model=32", "n_layers=1", "n_heads=2", "d_latent=8", "d_proj=8", "batch_size=8",
            "token_size=32", "splits=[0.5,0.25,0.25]"]


def _net(name, seed=0):
    c, s = SHAPES[name]
    m = zoo.create_model(name, in_channels=c, input_size=s, num_classes=10, **KWARGS.get(name, {}))
    return init_weights(m, "kaiming_uniform", 1.0, torch.Generator().manual_seed(seed)).eval(), input_shape(name)


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("token_size", [7, 64])
def test_tokenization_round_trip_is_bitwise(name, token_size):
    net, _ = _net(name)
    layout = Layout.of(net)
    tok = Tokenizer.from_layout(layout, token_size)
    w = flatten_state(net)
    flat = torch.stack([w, torch.randn_like(w) * 1e30, -torch.rand_like(w) * 1e-30])
    tokens = tok.tokenize(flat)
    assert tokens.shape == (3, tok.n_tokens, token_size)
    assert torch.equal(tok.detokenize(tokens), flat)
    assert torch.equal(tok.index[tok.mask].sort().values, torch.arange(len(w)))  # every weight exactly once
    assert (tokens[:, ~tok.mask] == 0).all()
    assert tok.positions[:, 0].tolist() == list(range(tok.n_tokens))  # global index
    assert tok.positions[:, 1].unique().tolist() == list(range(int(tok.positions[:, 1].max()) + 1))


def test_token_is_one_unit_incoming_weights_and_bias():
    net, _ = _net("cnn_s")
    tok = Tokenizer.from_layout(Layout.of(net), 256)
    tokens = tok.tokenize(flatten_state(net))
    conv2 = net[4]  # conv(8, 6, 5): a unit has 8*25 weights + 1 bias
    row = tokens[8 + 2]  # 8 conv1 tokens come first; unit 2 of conv2
    assert torch.equal(row[:200], conv2.weight[2].reshape(-1)) and row[200] == conv2.bias[2]
    assert tok.positions[10].tolist() == [10, 1, 2]


@pytest.mark.parametrize("name", list_models())
def test_permutation_augmentation_preserves_function(name):
    net, shape = _net(name)
    layout, flat = Layout.of(net), flatten_state(net)
    perm = Permuter(layout, find_couplings(net, shape))
    assert perm.couplings, name
    idx = perm.random_index(torch.Generator().manual_seed(3))
    other, _ = _net(name, seed=1)
    other.load_state_dict(layout.unflatten(flat[idx]))
    x = sample_input(name, 6)
    with torch.no_grad():
        assert torch.allclose(other(x), net(x), atol=1e-5, rtol=1e-4)
    assert not torch.equal(flat[idx], flat)
    assert torch.equal(perm.align(flat[idx], flat), flat)  # weight matching undoes it


def test_split_is_by_member_without_overlap():
    usable = np.ones(100, bool)
    usable[[3, 50]] = False
    split = split_members(usable, (0.6, 0.2, 0.2), seed=0)
    assert (split[[3, 50]] == -1).all() and np.bincount(split[split >= 0]).tolist() == [59, 20, 19]
    assert np.array_equal(split, split_members(usable, (0.6, 0.2, 0.2), seed=0))


def test_layer_stats_match_numpy(tiny_zoo):
    with zoo.open(tiny_zoo) as z:
        members = np.array([0, 2, 5])
        mean, std = layer_stats(z, members, [0, 2], chunk=2)
        w = z.file["weights"][members][:, [0, 2]].reshape(-1, z.n_params)
        sl = z.layout[2].slice
        assert np.allclose(mean[sl], w[:, sl].mean(), atol=1e-6) and np.allclose(std[sl], w[:, sl].std(), rtol=1e-4)


@pytest.fixture(scope="module")
def tiny_run(tiny_zoo, tmp_path_factory):
    cfg = load_config(FitConfig, None, TINY_FIT + [f"zoo={tiny_zoo}", f"out={tmp_path_factory.mktemp('hr') / 'run'}"])
    return fit_run(cfg)


def test_fit_loss_decreases_and_records_split(tiny_run, tiny_zoo):
    df = pd.read_csv(next(tiny_run.glob("logs/version_*/metrics.csv")))
    train = df["train_loss"].dropna().tolist()
    assert len(train) == 3 and train[-1] < train[0]
    module, meta = load_run(tiny_run)
    assert sorted(np.bincount(meta["split"]).tolist()) == [4, 4, 8] and meta["slots"] == [0, 1, 2]
    assert (tiny_run / "loss.png").stat().st_size > 1000
    with zoo.open(tiny_zoo) as z:  # normalisation is undone on decode
        flat = torch.from_numpy(z.weights(0, 1))[None]
        assert torch.allclose(module.to_weights(module.to_tokens(flat)), flat, atol=1e-5)


def test_split_command_writes_the_fits_split_before_it_trains(tiny_run, tiny_zoo, tmp_path, capsys):
    import json

    from hyperrep.embeddings import TEST
    from hyperrep.split import main as split_main
    out = tmp_path / "split.json"
    args = TINY_FIT + [f"zoo={tiny_zoo}", "--out", str(out)]
    assert run_cli(split_main, args) == 0
    record = json.loads(out.read_text())
    _, meta = load_run(tiny_run)
    assert record["test_members"] == np.flatnonzero(meta["split"] == TEST).tolist() and record["test_members"]
    assert record["config"]["split_seed"] == 0 and record["version"] == zoo.__version__
    capsys.readouterr()
    assert run_cli(split_main, args) == 2 and "already exists" in capsys.readouterr().err  # never overwritten


def test_embed_writes_every_member_and_checkpoint(tiny_run, tiny_zoo, tmp_path):
    out = embed_zoo(tiny_zoo, tiny_run, tmp_path / "e.h5", progress=False)
    with h5py.File(out) as f:
        assert f["embeddings"].shape == (16, 3, 8) and np.isfinite(f["embeddings"][:]).all()
        assert f.attrs["format"] == "weightzoo-embeddings/1" and len(f["split"]) == 16
    keys = pq.read_table(out.with_suffix(".parquet")).to_pandas()
    assert len(keys) == 48 and set(keys.columns) >= {"model_id", "checkpoint", "epoch", "split"}


def test_windowed_embedding_covers_the_model(tiny_run, tiny_zoo):
    module, _ = load_run(tiny_run)
    with zoo.open(tiny_zoo) as z:
        flat = torch.from_numpy(np.stack([z.weights(0, 2), z.weights(1, 2)]))
    full = module.embed(flat)
    object.__setattr__(module.cfg, "window", 40)  # smaller than the 186 tokens: covered by 5 windows
    windowed = module.embed(flat)
    assert windowed.shape == full.shape == (2, 8) and torch.isfinite(windowed).all()
    assert not torch.allclose(windowed, full)


def test_fit_stops_at_its_time_limit_and_records_the_epochs_done(tiny_zoo, tmp_path):
    cfg = load_config(FitConfig, None, TINY_FIT + [f"zoo={tiny_zoo}", f"out={tmp_path / 'run'}", "epochs=50",
                                                   "max_minutes=0.0001"])
    _, meta = load_run(fit_run(cfg))
    assert meta["epochs_done"] < 50 and meta["steps_done"] >= 1  # stopped by the clock, exported all the same
    assert meta["config"]["max_minutes"] == 0.0001


def test_one_cycle_is_torchs_one_cycle_schedule():
    from hyperrep.module import one_cycle

    for total in (1, 2, 7, 100):
        opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=total)
        for step in range(total):
            assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * one_cycle(step, total), rel=1e-9, abs=1e-15)
            opt.step()
            if step < total - 1:
                sched.step()


def test_a_time_bounded_fit_anneals_its_learning_rate_within_the_limit(tiny_zoo, tmp_path):
    """max_minutes ends the fit long before its 200 epochs: the one-cycle schedule follows the clock, so the lr
    rises to its peak and is annealed by the time the fit stops (before, it stopped in the warm-up)."""
    out = tmp_path / "run"
    cfg = load_config(FitConfig, None, TINY_FIT + [f"zoo={tiny_zoo}", f"out={out}", "epochs=200", "max_minutes=0.05",
                                                   "log_every=1", "lr=0.001"])
    _, meta = load_run(fit_run(cfg))
    assert meta["epochs_done"] < 200
    lr = pd.read_csv(out / "logs" / "version_0" / "metrics.csv")["lr"].dropna().to_numpy()
    assert len(lr) > 20, len(lr)
    assert lr.max() > 0.8e-3 and lr[-1] < 0.1e-3, (lr.max(), lr[-1])  # peaked, then annealed
    assert lr.argmax() < 0.6 * len(lr)


def test_fit_resumes_from_last_checkpoint(tiny_zoo, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(FitConfig, None, TINY_FIT + [f"zoo={tiny_zoo}", f"out={out}"])

    def stop_after_first_epoch(self):
        if self.current_epoch == 1:
            raise KeyboardInterrupt  # what Ctrl-C or a preemption signal does
    monkeypatch.setattr("hyperrep.module.HyperRepModule.on_train_epoch_start", stop_after_first_epoch, raising=False)
    with pytest.raises((SystemExit, zoo.UsageError)):  # Lightning ends the process on an interrupt
        fit_run(cfg)
    assert (out / "checkpoints" / "last.ckpt").exists() and not (out / "model.pt").exists()
    monkeypatch.undo()
    fit_run(cfg)
    second = pd.read_csv(out / "logs" / "version_1" / "metrics.csv")
    assert second["epoch"].dropna().unique().tolist() == [1, 2]  # only the remaining epochs ran
    assert (out / "model.pt").exists()


@pytest.mark.parametrize("flags,aligned,permuted", [(["align=true"], True, True),
                                                    (["align=true", "permute=false"], True, False),
                                                    (["permute=false"], False, False), ([], False, True)])
def test_fit_aligns_and_permutes_as_configured(tiny_zoo, tmp_path, flags, aligned, permuted, monkeypatch):
    calls = {"align": 0, "random_index": 0}
    for name in calls:
        original = getattr(Permuter, name)

        def counted(self, *a, _name=name, _original=original, **kw):
            calls[_name] += 1
            return _original(self, *a, **kw)
        monkeypatch.setattr(Permuter, name, counted)
    cfg = load_config(FitConfig, None, TINY_FIT + ["epochs=1", f"zoo={tiny_zoo}", f"out={tmp_path / 'run'}", *flags])
    module, _ = load_run(fit_run(cfg))
    assert torch.isfinite(next(module.parameters())).all()
    assert (calls["align"] > 0) == aligned and (calls["random_index"] > 0) == permuted, calls


def test_aligned_views_are_the_members_weight_matched_to_the_reference(tiny_zoo):
    from hyperrep.data import WeightViews

    with zoo.open(tiny_zoo) as z:
        perm = Permuter.of(z.spec)
        ref = torch.from_numpy(z.weights(0, 2))
        views = WeightViews(str(tiny_zoo), np.array([[3, 2], [0, 2]]), perm, False, ref)
        a, b, _ = views[0]
        expected = perm.align(torch.from_numpy(z.weights(3, 2)), ref)
        assert torch.equal(a, expected) and torch.equal(b, expected)
        assert not torch.equal(a, torch.from_numpy(z.weights(3, 2)))  # matching moved units
        assert torch.equal(views[1][0], ref)  # the reference is already matched to itself


def test_nt_xent_prefers_matching_views():
    a = torch.randn(16, 8)
    assert nt_xent(a, a + 0.01 * torch.randn_like(a), 0.1) < nt_xent(a, torch.randn(16, 8), 0.1)


def test_bad_inputs(tmp_path, capsys, tiny_zoo):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = [1]
    cases = [(["--zoo", str(tmp_path / "missing.h5")], "does not exist; build one"),
             (["--zoo", str(other)], "is not a weightzoo zoo"),
             (["--zoo", str(tiny_zoo), "widht=3"], "unknown config key 'widht'"),
             (["--zoo", str(tiny_zoo), "checkpoints=[7]"], "out of range")]
    for argv, message in cases:
        assert run_cli(fit_main, argv + ["--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_ddp_on_two_processes(tiny_zoo, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "hyperrep.fit", "--zoo", str(tiny_zoo), "--out", str(out),
                        "accelerator=cpu", "devices=2", *TINY_FIT[:1], "epochs=1", *TINY_FIT[1:],
                        "max_minutes=10"],  # the ranks share the time-based lr (a max over their clocks)
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("hyper-representation written to") == 1  # rank 0 exports
    module, meta = load_run(out)
    assert sorted(np.bincount(meta["split"]).tolist()) == [4, 4, 8]


@pytest.mark.parametrize("in_memory", [True, False])
def test_training_views_are_function_preserving_permutations(tiny_zoo, in_memory):
    from hyperrep.data import WeightViews

    with zoo.open(tiny_zoo) as z:
        perm = Permuter.of(z.spec)
        views = WeightViews(str(tiny_zoo), np.array([[4, 2], [7, 1]]), perm, True, None, in_memory=in_memory)
        data = z.dataset()
        x = data.normalize(data.x_test[:32])
        for i, (_, m, s) in enumerate(views.items):
            a, b, code = views[i]
            assert not torch.equal(a, b) and code == 0
            for view in (a, b):
                net = z.spec.create(z.activations()[m]).eval()
                net.load_state_dict(z.layout.unflatten(view))
                with torch.no_grad():
                    assert torch.allclose(net(x), z.model(m, s)(x), atol=1e-5)


def test_fit_logs_to_tensorboard_per_step_and_one_line_per_epoch_off_a_terminal(tiny_zoo, tmp_path):
    pytest.importorskip("tensorboard")
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "WEIGHTZOO_QUIET"}
    r = subprocess.run([sys.executable, "-m", "hyperrep.fit", "--zoo", str(tiny_zoo), "--out", str(out), *TINY_FIT,
                        "loggers=[csv,tensorboard]", "log_every=1"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    epochs = [ln for ln in r.stderr.splitlines() if ln.startswith("epoch ")]
    assert len(epochs) == 3 and all("steps/s" in ln for ln in epochs) and "\r" not in r.stderr
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    logs = pd.read_csv(next(out.glob("logs/version_*/metrics.csv")))
    assert logs["train_loss_step"].notna().sum() >= 3 and logs["lr"].notna().sum() >= 3


def test_per_layer_loss_normalisation_weights_every_layer_equally(tiny_zoo, tmp_path):
    from hyperrep import layer_weights, masked_mse
    tok = Tokenizer.from_layout(zoo.open(tiny_zoo).layout, 32)
    mask = tok.mask[None].expand(2, -1, -1)
    layer = tok.positions[:, 1]
    pred, target = torch.randn(2, *tok.index.shape), torch.zeros(2, *tok.index.shape)
    per_layer = [masked_mse(pred[:, layer == k], target[:, layer == k], mask[:, layer == k])
                 for k in layer.unique()]
    assert torch.allclose(masked_mse(pred, target, layer_weights(mask, layer)), torch.stack(per_layer).mean())
    assert not torch.allclose(masked_mse(pred, target, mask), torch.stack(per_layer).mean())  # layers differ in size
    cfg = load_config(FitConfig, None, TINY_FIT + [f"zoo={tiny_zoo}", f"out={tmp_path / 'run'}", "loss_norm=layer",
                                                   "epochs=1"])
    _, meta = load_run(fit_run(cfg))
    assert meta["config"]["loss_norm"] == "layer"
