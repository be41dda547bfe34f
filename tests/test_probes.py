import json
from pathlib import Path

import h5py
import nbclient
import nbformat
import numpy as np
import pandas as pd
import pytest
from test_models import SHAPES

from probes import COLUMNS, evaluate_probes, load_probe_data, markdown_table, member_split, score, weight_stats
from probes.evaluate import main
from zoo import Layout, create_model, list_models
from zoo.cli import run_cli


@pytest.mark.parametrize("name", list_models())
def test_weight_statistics_on_every_architecture(name):
    c, s = SHAPES[name]
    layout = Layout.of(create_model(name, in_channels=c, input_size=s))
    W = np.random.default_rng(0).normal(size=(4, layout.n_params))
    sW, names = weight_stats(W, layout)
    assert sW.shape == (4, 7 * len(layout)) and len(names) == sW.shape[1] and np.isfinite(sW).all()
    e = layout[0]
    block = W[:, e.slice]
    assert np.allclose(sW[:, :7], np.column_stack([block.mean(1), block.var(1),
                                                   *np.quantile(block, [0, .25, .5, .75, 1], axis=1)]), atol=1e-5)


def test_split_never_puts_a_member_on_both_sides(tiny_zoo):
    data = load_probe_data([tiny_zoo])
    for seed in range(5):
        test = member_split(data, seed, 0.25)
        members = data.rows["member"].to_numpy()
        assert test.any() and (~test).any() and not set(members[test]) & set(members[~test])
    data.emb_split = np.where(data.rows["model_id"] % 4 == 0, 2, 0)  # a hyperrep split is reused
    assert np.array_equal(member_split(data, 0, 0.25), data.rows["model_id"].to_numpy() % 4 == 0)


def test_pure_noise_target_cannot_be_predicted(tiny_zoo):
    data = load_probe_data([tiny_zoo])
    rng = np.random.default_rng(0)
    data.rows["test_acc"] = rng.normal(size=len(data.rows))  # a target unrelated to the weights
    results, _, _ = evaluate_probes(data, ["test_acc"], seed=0, n_boot=100)
    for _, r in results.iterrows():
        assert r["r2"] < 0.1 and r["r2_lo"] < 0, r["column"]


def test_regress_probes_few_valued_targets_as_continuous(tiny_zoo):
    from probes import target_kind
    from zoo import UsageError
    data = load_probe_data([tiny_zoo])
    test = member_split(data, 0, 0.2)
    members = data.rows["member"].to_numpy()
    rank = {m: i for i, m in enumerate(np.unique(members[test]))}  # the test members hold several values
    fraction = np.array([0.1, 0.25, 0.5, 1.0])[[rank.get(m, m) % 4 for m in members]]
    data.rows["train_fraction"] = fraction
    assert target_kind(data.rows["train_fraction"], "train_fraction") == "categorical"
    results, predictions, _ = evaluate_probes(data, ["train_fraction"], n_boot=5, regress=("train_fraction",))
    assert set(results["kind"]) == {"continuous"} and results["r2"].notna().all()
    y, pred = predictions["train_fraction"]["W linear"]
    assert pred.dtype.kind == "f" and set(np.unique(y)) <= set(fraction)
    with pytest.raises(UsageError, match="cannot be regressed"):
        target_kind(pd.Series(["relu", "tanh"]), "activation", ("activation",))


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.normal(size=200)
    out = score("continuous", y, y + 0.5 * rng.normal(size=200), np.repeat(np.arange(50), 4), 300, 0)
    assert out["r2_lo"] < out["r2"] < out["r2_hi"] and 0.6 < out["r2"] < 0.9 and out["kendall_tau"] > 0.5


def test_cli_table_files_and_plots(default_pipeline, tmp_path, capsys):
    zoo_path, emb = default_pipeline
    out = tmp_path / "probes"
    assert run_cli(main, ["--zoo", str(zoo_path), "--embeddings", str(emb), "--targets", "test_acc", "init",
                          "--out", str(out), "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert "| target | metric | W linear | s(W) linear | s(W) gbm | emb linear |" in printed
    assert "| test_acc | R² |" in printed and "| test_acc | Kendall τ |" in printed and "| init | acc |" in printed
    assert {p.name for p in out.iterdir()} >= {"results.csv", "results.json", "table.md", "split.json", "plots"}
    assert (out / "plots" / "test_acc.png").stat().st_size > 5000
    assert len(json.loads((out / "results.json").read_text())["results"]) == 8


def test_columns_pick_the_probes_to_fit(default_pipeline, tmp_path):
    """columns=... fits only those probes (the baselines can run while the encoder trains, embeddings after)."""
    zoo_path, emb = default_pipeline
    out = tmp_path / "emb_only"
    assert run_cli(main, ["--zoo", str(zoo_path), "--embeddings", str(emb), "--targets", "test_acc", "--out",
                          str(out), "--bootstrap", "5", "--quiet", "columns=[emb linear]"]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["column"] for r in results] == ["emb linear"]
    assert (out / "table.md").read_text().startswith("| target | metric | emb linear |")


def test_quality_bars_on_the_default_zoo(default_pipeline):
    """s(W) ridge R^2 for test accuracy >= 0.8; the embedding probe not below the raw-weights probe."""
    zoo_path, emb = default_pipeline
    results, _, _ = evaluate_probes(load_probe_data([zoo_path], [emb]), ["test_acc"], seed=0, n_boot=50)
    r2 = dict(zip(results["column"], results["r2"]))
    assert r2["s(W) linear"] >= 0.8, r2
    assert r2["emb linear"] >= r2["W linear"], r2


def test_token_sequence_embeddings_and_their_probe(default_pipeline, tmp_path):
    """embed sequence=true keeps every token's latent (its mean is the embedding); probes add `emb seq linear`."""
    from hyperrep.embed import main as embed_main
    from hyperrep.embeddings import Embeddings
    zoo_path, emb = default_pipeline
    seq_path = tmp_path / "seq.h5"
    assert run_cli(embed_main, ["--zoo", str(zoo_path), "--model", Embeddings.open(emb).model, "--out", str(seq_path),
                                "--device", "cpu", "sequence=true", "--quiet"]) == 0
    e, plain = Embeddings.open(seq_path), Embeddings.open(emb)
    assert e.sequence.shape[:2] == e.embeddings.shape[:2] and plain.sequence is None
    ok = np.isfinite(e.embeddings).all(-1)
    assert np.allclose(e.sequence[ok].mean(1), e.embeddings[ok], atol=1e-5)
    assert np.allclose(e.embeddings[ok], plain.embeddings[ok], atol=1e-5)
    data = load_probe_data([zoo_path], [seq_path], checkpoints=[-1])
    assert data.emb_seq.shape == (len(data.rows), e.sequence.shape[2] * e.sequence.shape[3])
    results, _, _ = evaluate_probes(data, ["test_acc"], n_boot=5)
    r2 = dict(zip(results["column"], results["r2"]))
    assert set(r2) == set(COLUMNS) and np.isfinite(r2["emb seq linear"])
    assert markdown_table(results).splitlines()[0].endswith("| emb linear | emb seq linear |")


@pytest.mark.parametrize("notebook", ["01_probe_zoo", "02_embedding_space"])
def test_notebooks_run_headless(notebook, default_pipeline, monkeypatch):
    monkeypatch.setenv("WEIGHTZOO_ZOO", str(default_pipeline[0]))
    nb = nbformat.read(Path("probes/notebooks") / f"{notebook}.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": "probes/notebooks"}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_bad_inputs(tiny_zoo, tmp_path, capsys):
    other = tmp_path / "other.embeddings.h5"
    with h5py.File(other, "w") as f:
        f.attrs["format"] = "weightzoo-embeddings/1"
        f["embeddings"] = np.zeros((3, 2, 4), np.float32)
        f["split"] = np.zeros(3, np.int8)
    cases = [(["--embeddings", str(tmp_path / "none.h5")], "does not exist; run python -m hyperrep.embed"),
             (["--targets", "accuracy"], "unknown target 'accuracy'"),
             (["--embeddings", str(other)], "embeddings of another zoo"),
             (["--targets", "dataset"], "target 'dataset' needs several zoos"),
             (["columns=[W lin]"], "unknown probe column 'W lin'"),
             (["regress=[fraction]"], "unknown target 'fraction' in regress"),
             (["columns=[emb seq linear]"], "none of the asked probe columns has inputs")]
    for argv, message in cases:
        assert run_cli(main, ["--zoo", str(tiny_zoo), "--out", str(tmp_path / "o")] + argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_dataset_is_probed_across_zoos(tiny_zoo, tmp_path):
    from conftest import tiny_config

    from zoo.build import build

    rng = np.random.default_rng(0)  # a second dataset: noise images of the same shape as digits
    x = rng.integers(0, 256, (600, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", x_train=x[:500], y_train=rng.integers(0, 10, 500), x_test=x[500:],
             y_test=rng.integers(0, 10, 100))
    other = build(tiny_config(f"dataset=npz:{tmp_path / 'noise.npz'}", "seed=100"), tmp_path / "noise.h5",
                  progress=False)
    data = load_probe_data([tiny_zoo, other], checkpoints=[1, 2])
    assert set(data.rows["dataset"]) == {"digits", f"npz:{tmp_path / 'noise.npz'}"}
    results, _, _ = evaluate_probes(data, ["dataset"], seed=0, n_boot=20)
    assert results["accuracy"].max() > 0.8, results[["column", "accuracy"]]


@pytest.mark.parametrize("device", ["cpu", "torch"])
def test_ridge_folds_solve_ridge_exactly(device):
    from sklearn.linear_model import Ridge

    from probes._probe import _RidgeCV, _RidgeFolds
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(120, 30)), rng.normal(size=120)
    folds = _RidgeFolds(X, np.arange(120) // 4, 5, device)
    for alpha in (1e-3, 1.0, 100.0):
        coef, intercept = folds.path(y, -1, [alpha])
        ref = Ridge(alpha=alpha).fit(X, y)
        np.testing.assert_allclose(coef[:, 0], ref.coef_, atol=1e-8)
        assert abs(intercept[0] - ref.intercept_) < 1e-8
    tr, va = folds.splits[0]  # a fold's solution is ridge on that fold's training rows alone
    coef, _ = folds.path(y, 0, [3.0])
    np.testing.assert_allclose(coef[:, 0], Ridge(alpha=3.0).fit(X[tr], y[tr]).coef_, atol=1e-8)
    model = _RidgeCV().fit(folds, y)
    assert model.alpha_ in _RidgeCV.alphas


@pytest.mark.parametrize("device", ["cpu", "torch"])
def test_row_space_inputs_give_the_same_ridge_predictions(device):
    """More features than training rows: prepare() hands the probes row-space coordinates, which must leave
    every L2-penalised linear prediction unchanged."""
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    from probes._probe import prepare
    from probes.features import ProbeData
    rng = np.random.default_rng(1)
    n, p = 60, 200
    W = rng.normal(size=(n, p)).astype(np.float32)
    rows = pd.DataFrame({"member": np.arange(n), "model_id": np.arange(n)})
    data = ProbeData(rows, W, W[:, :4], None, None, ["a", "b", "c", "d"])
    test = np.arange(n) % 5 == 0
    y = W[:, :3].astype(np.float64).sum(1) + rng.normal(size=n)
    Xtr, Xte = prepare("W linear", data, test, device)
    assert Xtr.shape[1] <= (~test).sum() < p
    scaler = StandardScaler().fit(W[~test].astype(np.float64))
    full = Ridge(alpha=1.0).fit(scaler.transform(W[~test].astype(np.float64)), y[~test])
    proj = Ridge(alpha=1.0).fit(Xtr, y[~test])
    np.testing.assert_allclose(proj.predict(Xte), full.predict(scaler.transform(W[test].astype(np.float64))),
                               atol=1e-6)


def test_statistics_probe_inputs_are_reproducible_on_large_zoos():
    """s(W)'s rank-Gaussianisation uses every training row: sklearn's default fits its quantiles on an
    unseeded 10,000-row subsample, which made `s(W) linear` differ between two runs of a 40,000-row zoo."""
    from probes._probe import prepare
    from probes.features import ProbeData
    rng = np.random.default_rng(2)
    n = 15_000  # 12,000 training rows
    sW = rng.standard_cauchy(size=(n, 3)).astype(np.float32)
    rows = pd.DataFrame({"member": np.arange(n), "model_id": np.arange(n)})
    data = ProbeData(rows, sW, sW, None, None, ["a", "b", "c"])
    test = np.arange(n) % 5 == 0
    first, second = prepare("s(W) linear", data, test), prepare("s(W) linear", data, test)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_torch_logistic_matches_sklearn(n_classes):
    """The torch categorical probe minimises sklearn's LogisticRegression objective: the same coefficients
    (binary: one vector, class 1's) and the same predictions."""
    from sklearn.linear_model import LogisticRegression

    from probes._logistic import TorchLogistic
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 6))
    scores = X[:, :n_classes] + rng.normal(size=(300, n_classes))  # (n, classes)
    y = np.array(["adam", "sgd", "rmsprop"][:n_classes])[scores.argmax(1)]
    for C in (0.01, 1.0):
        ref = LogisticRegression(C=C, tol=1e-10, max_iter=5000).fit(X, y)
        ours = TorchLogistic(C, "torch").fit(X, y)
        assert list(ours.classes_) == list(ref.classes_)
        np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-5)
        np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=1e-4)
        assert (ours.predict(X) == ref.predict(X)).all()


def test_categorical_probes_on_torch_agree_with_sklearn(tmp_path):
    """evaluate_probes with the torch device (what CUDA runs) gives the sklearn path's categorical accuracies."""
    from probes.features import ProbeData
    rng = np.random.default_rng(4)
    n = 400
    W = rng.normal(size=(n, 12)).astype(np.float32)
    rows = pd.DataFrame({"member": np.arange(n) // 2, "model_id": np.arange(n) // 2,
                         "optimizer": np.where(W[:, 0] + 0.5 * rng.normal(size=n) > 0, "adam", "sgd")})
    data = ProbeData(rows, W, W[:, :4], None, None, ["a", "b", "c", "d"])
    cpu, _, _ = evaluate_probes(data, ["optimizer"], n_boot=0, device="cpu", columns=["W linear", "s(W) linear"])
    torch_, _, _ = evaluate_probes(data, ["optimizer"], n_boot=0, device="torch", columns=["W linear", "s(W) linear"])
    assert (cpu["accuracy"] > 0.7).all()
    np.testing.assert_allclose(torch_["accuracy"], cpu["accuracy"], atol=0.01)
