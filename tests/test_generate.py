"""Decoded and sampled networks: reconstruction, sampling, fine-tuning, the memorization test."""
import os

import numpy as np
import pandas as pd
import pytest
import torch

import zoo
from hyperrep import FitConfig, embed_zoo, fit_run, load_run
from hyperrep._sample import draw_latents
from hyperrep.config import ReconstructConfig, SampleConfig
from hyperrep.reconstruct import main as reconstruct_main
from hyperrep.sample import main as sample_main
from probes.evaluate import main as probes_main
from zoo import Permuter
from zoo.cli import load_config, run_cli
from zoo.compare import agreement, error_iou, nearest
from zoo.solo import accuracy

os.environ["WEIGHTZOO_QUIET"] = "1"
TINY_FIT = ["epochs=2", "d_model=32", "n_layers=1", "n_heads=2", "d_latent=8", "d_proj=8", "batch_size=8",
            "token_size=32", "splits=[0.5,0.25,0.25]"]


@pytest.fixture(scope="module")
def run(tiny_zoo, tmp_path_factory):
    cfg = load_config(FitConfig, None, TINY_FIT + ["beta=0.5", "probe_images=32", f"zoo={tiny_zoo}",
                                                   f"out={tmp_path_factory.mktemp('hr') / 'run'}"])
    return fit_run(cfg)


def test_functional_loss_is_logged_and_zero_for_a_perfect_decoder(run, tiny_zoo):
    logs = pd.read_csv(next(run.glob("logs/version_*/metrics.csv")))
    assert logs["train_kl"].dropna().gt(0).all() and "lr" in logs
    module, _ = load_run(run)
    from hyperrep._fit import _set_probe
    with zoo.open(tiny_zoo) as z:
        _set_probe(module, z, module.cfg, module.activations)
        W = torch.from_numpy(z.weight_rows([0, 5, 9], 2))
        codes = torch.tensor([module.activations.index(z.activations()[m]) for m in (0, 5, 9)])
    assert float(module.functional_loss(W, W, codes)) == pytest.approx(0, abs=1e-6)
    assert float(module.functional_loss(W * 0.5, W, codes)) > 1e-4


def test_decoded_networks_load_and_reproduce_the_reported_accuracy(run, tiny_zoo, tmp_path):
    out = tmp_path / "rec"
    assert run_cli(reconstruct_main, ["--zoo", str(tiny_zoo), "--model", str(run), "--out", str(out), "--quiet",
                                      "members=all", "checkpoints=[0,-1]"]) == 0
    rows = pd.read_csv(out / "results.csv")
    assert set(rows["slot"]) == {0, 2} and len(rows) == 32 and (out / "scatter.png").stat().st_size > 1000
    module, _ = load_run(run)
    with zoo.open(tiny_zoo) as z:
        data = z.dataset()
        for _, r in rows[rows["slot"] == 2].head(4).iterrows():
            m = int(r["member"])
            net = z.spec.create(z.activations()[m])
            net.load_state_dict(z.layout.unflatten(module.reconstruct(torch.from_numpy(z.weights(m, 2))[None])[0]))
            assert accuracy(net, data) == pytest.approx(r["reconstructed_acc"], abs=1e-6)
            assert accuracy(z.model(m, 2), data) == pytest.approx(r["original_acc"], abs=1e-6)
    summary = pd.read_csv(out / "summary.csv")
    assert {"keeps_90", "delta_permuted", "delta_between_members"} <= set(summary.columns)
    assert "| epoch | members |" in (out / "table.md").read_text()


def test_windowed_reconstruction_covers_every_token(run, tiny_zoo):
    module, _ = load_run(run)
    object.__setattr__(module.cfg, "window", 40)
    T = module.tokenizer.n_tokens
    covered = np.zeros(T, int)
    for sl in module.windows(T):
        covered[sl] += 1
    assert covered.min() >= 1 and max(sl.stop for sl in module.windows(T)) == T
    with zoo.open(tiny_zoo) as z:
        W = torch.from_numpy(z.weight_rows([1, 2], 1))
    assert torch.isfinite(module.reconstruct(W)).all() and module.encode_latents(W).shape == (2, T, 8)


def test_sample_writes_a_zoo_every_tool_reads(run, tiny_zoo, tmp_path):
    out = tmp_path / "s.h5"
    assert run_cli(sample_main, ["--zoo", str(tiny_zoo), "--model", str(run), "--out", str(out), "--n", "4",
                                 "--top", "0.5", "finetune=[0,1]", "subsample=2", "--quiet"]) == 0
    with zoo.open(out) as z:
        groups = z.field("group")
        assert z.n_models == len(groups) and {"sampled", "scratch", "zoo_top", "noise_0.02", "gaussian"} <= set(groups)
        assert list(z.epochs) == [0, 1] and z.done.all() and z.file.attrs["source_model_sha256"]
        top = np.flatnonzero(groups == "zoo_top")
        src = z.field("source_member")[top]
        with zoo.open(tiny_zoo) as src_zoo:  # zoo_top members are the source members, unchanged at epoch 0
            assert np.array_equal(z.weight_rows(top, 0), src_zoo.weight_rows(src, -1))
    emb = embed_zoo(out, run, progress=False)
    assert emb.exists()
    assert run_cli(probes_main, ["--zoo", str(out), "--out", str(tmp_path / "p"), "--bootstrap", "5",
                                 "--targets", "test_acc", "epoch"]) == 0
    report = pd.read_csv(tmp_path / "s.novelty.csv")
    assert (report.loc[report["group"] == "zoo_top", "nearest_l2"] == 0).all()
    assert (report.loc[report["group"] == "zoo_top", "max_error_iou"] == 1).all()
    for suffix in (".novelty.png", ".finetune.png", ".summary.md", ".finetune.csv"):
        assert (tmp_path / f"s{suffix}").exists(), suffix


def test_novelty_metrics_on_known_cases(tiny_zoo):
    with zoo.open(tiny_zoo) as z:
        W = z.weight_rows(np.arange(6), 2)
        perm = Permuter.of(z.spec)
        g = torch.Generator().manual_seed(1)
        permuted = np.stack([w[perm.random_index(g).numpy()] for w in W[:3]])
    near_self = nearest(W[:3], W, perm)
    assert np.allclose(near_self.raw_l2, 0) and np.array_equal(near_self.raw_index, [0, 1, 2])
    near_perm = nearest(permuted, W, perm)
    assert (near_perm.raw_l2 > 1).all()  # a permuted copy looks far away in raw L2
    assert np.allclose(near_perm.aligned_l2, 0, atol=1e-5) and np.array_equal(near_perm.aligned_index, [0, 1, 2])
    wrong = np.random.default_rng(0).random((4, 50)) < 0.3
    iou = error_iou(wrong, wrong)
    assert np.allclose(np.diag(iou), 1) and (iou <= 1).all()
    assert error_iou(wrong[:1], ~wrong[:1])[0, 0] == 0
    pred = np.random.default_rng(1).integers(0, 10, (3, 40))
    assert np.allclose(np.diag(agreement(pred, pred)), 1) and agreement(pred[:1], (pred[:1] + 1) % 10)[0, 0] == 0


def test_kde_draws_come_from_the_anchors_tokens():
    Z = torch.stack([torch.full((5, 3), float(a)) for a in range(4)])  # anchor a's latents are all a
    g = torch.Generator().manual_seed(0)
    joint = draw_latents(Z, 50, "joint", 1e-9, g)
    assert torch.allclose(joint, joint[:, :1].expand_as(joint), atol=1e-6)  # one anchor per draw
    token = draw_latents(Z, 50, "token", 1e-9, g)
    assert set(token.round().unique().tolist()) <= {0, 1, 2, 3} and (token.std(1) > 0.1).any()  # anchors mix


def test_fine_tuning_starts_from_the_given_weights(digits):
    members = [zoo.MemberSpec(seed=i, batch_size=32) for i in range(3)]
    W = torch.randn(3, zoo.ModelSpec("cnn_gap", {}, digits.input_shape, 10).layout().n_params) * 0.1
    pop = zoo.Population("cnn_gap", {}, members, digits, initial=W)
    assert torch.equal(pop.flat, W)
    with pytest.raises(ValueError, match="initial weights must be"):
        zoo.Population("cnn_gap", {}, members, digits, initial=W[:2])


@pytest.mark.parametrize("argv,message", [
    (["--n", "0"], "'n' must be in [1, inf)"),
    (["--top", "1.5"], "'top' must be in (0, 1]"),
    (["finetune=[1,5]"], "finetune must be increasing epochs starting at 0"),
    (["groups=[scratch]"], "groups must include 'sampled'"),
])
def test_sample_bad_input_is_one_line(argv, message, run, tiny_zoo, tmp_path, capsys):
    out = tmp_path / "s.h5"
    assert run_cli(sample_main, ["--zoo", str(tiny_zoo), "--model", str(run), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_run_of_another_architecture_is_refused(run, tmp_path, capsys):
    from conftest import tiny_config

    from zoo.build import build

    other = build(tiny_config("architecture=mlp", "architecture_kwargs.widths=[8]"), tmp_path / "mlp.h5",
                  progress=False)
    for main, extra in ((sample_main, ["--out", str(tmp_path / "s.h5")]), (reconstruct_main, [])):
        assert run_cli(main, ["--zoo", str(other), "--model", str(run), *extra]) == 2
        err = capsys.readouterr().err
        assert "was fitted on another architecture (cnn_gap)" in err and err.count("\n") == 1


def test_configs_validate_their_keys():
    with pytest.raises(zoo.UsageError, match="'members' must be one of test, val, train, all"):
        load_config(ReconstructConfig, None, ["members=some"])
    with pytest.raises(zoo.UsageError, match="'mode' must be one of token, joint"):
        load_config(SampleConfig, None, ["mode=gauss"])
