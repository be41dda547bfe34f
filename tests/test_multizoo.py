"""One frozen encoder for many zoos: a fit over two zoos of one architecture, embeddings of both from one
model, the refusal of mixed encoders, and probes for the dataset and data traits."""
import json
import os
from pathlib import Path

import nbclient
import nbformat
import numpy as np
import pytest
from conftest import tiny_config

import zoo
from hyperrep import FitConfig, embed_zoo, fit_run, load_run
from hyperrep.fit import main as fit_main
from probes import evaluate_probes, load_probe_data, plot_embedding_space
from probes.evaluate import main as probes_main
from zoo.build import build
from zoo.cli import load_config, run_cli

os.environ["WEIGHTZOO_QUIET"] = "1"
TINY_FIT = ["epochs=2", "d_model=32", "n_layers=1", "n_heads=2", "d_latent=8", "d_proj=8", "batch_size=8",
            "token_size=32", "splits=[0.5,0.25,0.25]"]
TRAITS = ["n_random=24", "random.label_noise={uniform: [0.0, 0.6]}", "random.class_subset={subset: [10, 5, 10]}",
          "random.train_fraction={uniform: [0.3, 1.0]}", "random.lr={log_uniform: [0.003, 0.03]}", "grid={}",
          "fixed.batch_size=32", "epochs=2", "checkpoints=[0,2]"]


@pytest.fixture(scope="module")
def two_zoos(tmp_path_factory):
    """Trait zoos on digits and on a second dataset of the same shape (digits with inverted pixels and
    shifted labels, written as npz), the same member draws in both."""
    root = tmp_path_factory.mktemp("multi")
    d = zoo.load_dataset("digits")
    x_tr, x_te = 255 - d.x_train[:, 0].numpy(), 255 - d.x_test[:, 0].numpy()
    np.savez(root / "inverted.npz", x_train=x_tr, y_train=(d.y_train.numpy() + 3) % 10, x_test=x_te,
             y_test=(d.y_test.numpy() + 3) % 10)
    a = build(tiny_config(*TRAITS, "name=digits_traits"), root / "a.h5", progress=False)
    b = build(tiny_config(*TRAITS, "name=inverted_traits", f"dataset=npz:{root / 'inverted.npz'}"), root / "b.h5",
              progress=False)
    return a, b


@pytest.fixture(scope="module")
def joint_run(two_zoos, tmp_path_factory):
    a, b = two_zoos
    out = tmp_path_factory.mktemp("hr") / "joint"
    assert run_cli(fit_main, ["--zoo", str(a), str(b), "--out", str(out), *TINY_FIT]) == 0
    return out


def test_one_fit_over_two_zoos_records_both_and_their_splits(two_zoos, joint_run):
    module, meta = load_run(joint_run)
    assert [Path(e["path"]).name for e in meta["zoos"]] == ["a.h5", "b.h5"]
    assert len(meta["splits"]) == 2 and all(len(s) == 24 for s in meta["splits"])
    assert all(sorted(np.bincount(s[s >= 0]).tolist()) == [6, 6, 12] for s in meta["splits"])
    assert np.array_equal(meta["splits"][0], meta["splits"][1])  # twins on one side
    with zoo.open(two_zoos[0]) as za, zoo.open(two_zoos[1]) as zb:  # normalisation from both zoos' members
        from hyperrep.data import layer_stats
        tr = [np.flatnonzero(s == 0) for s in meta["splits"]]
        mean, std = layer_stats([za, zb], tr, meta["slots"])
    assert np.allclose(module.mean.numpy(), mean.numpy()) and np.allclose(module.std.numpy(), std.numpy())


def test_one_encoder_embeds_both_and_probes_the_dataset(two_zoos, joint_run, tmp_path):
    embs = [embed_zoo(z, joint_run, tmp_path / f"{z.stem}.emb.h5", progress=False, device="cpu") for z in two_zoos]
    data = load_probe_data(list(two_zoos), embs, checkpoints=[1])  # at epoch 0 twins are identical: no signal
    assert set(data.rows["dataset"]) == {"digits", f"npz:{two_zoos[0].parent / 'inverted.npz'}"}
    assert (data.emb_split >= 0).all()  # every member's split comes from the one run
    results, _, _ = evaluate_probes(data, ["dataset", "label_noise", "trained_classes"], n_boot=5)
    cells = results.set_index(["target", "column"])  # 24 members per zoo: the mechanics, not the quality
    assert 0 <= cells.loc[("dataset", "emb linear"), "accuracy"] <= 1
    assert cells.loc[("dataset", "emb linear"), "kind"] == "categorical"
    assert cells.loc[("trained_classes", "s(W) gbm"), "kind"] == "multilabel"
    assert 0 <= cells.loc[("trained_classes", "W linear"), "mean_balanced_accuracy"] <= 1
    figure = plot_embedding_space(data, tmp_path / "space.png")  # panels: dataset, label_noise
    assert figure.stat().st_size > 1000


def test_probes_refuse_embeddings_of_different_encoders(two_zoos, joint_run, tmp_path, capsys):
    a, b = two_zoos
    other = fit_run(load_config(FitConfig, None, TINY_FIT + ["epochs=1", f"zoo={b}", f"out={tmp_path / 'other'}"]))
    ea = embed_zoo(a, joint_run, tmp_path / "a.emb.h5", progress=False, device="cpu")
    eb = embed_zoo(b, other, tmp_path / "b.emb.h5", progress=False, device="cpu")
    assert run_cli(probes_main, ["--zoo", str(a), str(b), "--embeddings", str(ea), str(eb), "--targets",
                                 "dataset", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert f"{ea} and {eb} come from different encoders" in err and err.count("\n") == 1
    assert not (tmp_path / "p").exists()


def test_a_pure_noise_trait_is_not_predictable(two_zoos):
    data = load_probe_data(list(two_zoos))
    members = data.rows["member"].to_numpy()
    noise = np.random.default_rng(0).random(members.max() + 1)
    data.rows["noise_trait"] = noise[members]  # a per-member number that nothing in training saw
    results, _, _ = evaluate_probes(data, ["noise_trait"], n_boot=5)
    assert (results["r2"] < 0.15).all(), results[["column", "r2"]]


@pytest.mark.parametrize("argv,message", [
    (["--zoo", "{a}", "{a}"], "is listed twice"),
    (["--zoo", "{a}", "{mlp}"], "one hyper-representation needs one architecture"),
    (["--zoo", "{a}", "{b}", "beta=1.0"], "the functional loss (beta > 0) runs members on one dataset"),
])
def test_bad_multi_zoo_fits_are_one_line(argv, message, two_zoos, tmp_path, capsys):
    mlp = build(tiny_config("architecture=mlp", "architecture_kwargs.widths=[8]", "seeds=1", "grid.lr=[0.01]",
                            "grid.dropout=[0.0]", "grid.optimizer=[adam]"), tmp_path / "mlp.h5", progress=False)
    capsys.readouterr()
    names = {"a": two_zoos[0], "b": two_zoos[1], "mlp": mlp}
    args = [x.format(**names) for x in argv] + ["--out", str(tmp_path / "r"), *TINY_FIT]
    assert run_cli(fit_main, args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_cross_zoo_notebook_runs_headless(two_zoos, joint_run, monkeypatch):
    for z in two_zoos:
        embed_zoo(z, joint_run, z.with_suffix(".embeddings.h5"), overwrite=True, progress=False, device="cpu")
    monkeypatch.setenv("WEIGHTZOO_ZOOS", ",".join(map(str, two_zoos)))
    nb = nbformat.read(Path("probes/notebooks/03_one_encoder_many_zoos.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": "probes/notebooks"}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs) >= 2


def test_zoo_size_curve_fits_and_probes_the_first_members_only(two_zoos, tmp_path):
    """max_members=N fits on the first N members (the rest excluded, split -1); members=fit probes those only;
    the size-curve plot reads one probe directory per size."""
    import subprocess
    import sys
    a, _ = two_zoos
    out = tmp_path / "n12"
    assert run_cli(fit_main, ["--zoo", str(a), "--out", str(out), *TINY_FIT, "max_members=12"]) == 0
    split = np.asarray(load_run(out)[1]["splits"][0])
    assert (split[:12] >= 0).all() and (split[12:] == -1).all()
    emb = embed_zoo(a, out, tmp_path / "e.h5", progress=False, device="cpu")
    runs = []
    for members in ("fit", "all"):
        probe_out = tmp_path / f"probes_{members}"
        assert run_cli(probes_main, ["--zoo", str(a), "--embeddings", str(emb), "--targets", "test_acc", "lr",
                                     "--out", str(probe_out), "--bootstrap", "5", f"members={members}",
                                     "--quiet"]) == 0
        runs.append(f"{12 if members == 'fit' else 24}={probe_out}")
    test_fit = json.loads((tmp_path / "probes_fit" / "split.json").read_text())["test_members"]
    assert test_fit and all(m < 12 for m in test_fit)
    plot = [sys.executable, "benchmarks/size_curve_plot.py", *runs, "--out", str(tmp_path / "c.png")]
    done = subprocess.run([*plot, "--reference", "test_acc=0.9", "--reference-label", "HR21"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "c.md").read_text()
    assert (tmp_path / "c.png").stat().st_size > 1000 and "| test_acc | emb linear |" in table
    assert table.endswith("HR21: test_acc 0.9\n")
    bad = subprocess.run([*plot, "--reference", "test_acc"], capture_output=True, text=True)
    assert bad.returncode == 2 and "TARGET=NUMBER" in bad.stderr
