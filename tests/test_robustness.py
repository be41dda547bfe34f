"""Nothing lost, nothing wrong, nobody in: resume only what matches, one commit point per output, one writer
per output, exploded members flagged, every bad input one line (exit 2) with nothing written."""
import os
import pickle
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, tiny_config

import zoo
from hyperrep import FitConfig, embed_zoo, fit_run, load_run
from hyperrep.embed import main as embed_main
from hyperrep.fit import main as fit_main
from probes.evaluate import main as probes_main
from zoo.build import build
from zoo.build import main as build_main
from zoo.cli import load_config, run_cli
from zoo.join import main as join_main
from zoo.table import main as table_main

os.environ["WEIGHTZOO_QUIET"] = "1"
TINY_FIT = ["epochs=2", "d_model=32", "n_layers=1", "n_heads=2", "d_latent=8", "d_proj=8", "batch_size=8",
            "token_size=32", "splits=[0.5,0.25,0.25]"]


class Payload:
    """Unpickling this runs code: it must never happen when weightzoo loads a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _interrupted_fit(zoo_path, out, monkeypatch, *extra):
    cfg = load_config(FitConfig, None, TINY_FIT + [f"zoo={zoo_path}", f"out={out}", *extra])

    def stop(self):
        if self.current_epoch == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr("hyperrep.module.HyperRepModule.on_train_epoch_start", stop, raising=False)
    with pytest.raises((SystemExit, zoo.UsageError)):
        fit_run(cfg)
    monkeypatch.undo()
    assert (out / "checkpoints" / "last.ckpt").exists()


@pytest.fixture(scope="module")
def other_zoo(tmp_path_factory):
    return build(tiny_config("seed=7"), tmp_path_factory.mktemp("other") / "other.h5", progress=False)


# ---- 1. resume only from a matching checkpoint, never unpickling ----

@pytest.mark.parametrize("change,message", [("zoo", "zoo was"), ("d_model=48", "config.d_model was 32, now 48"),
                                            ("epochs=3", "config.epochs was 2, now 3")])
def test_a_fit_refuses_another_fits_checkpoint(tiny_zoo, other_zoo, tmp_path, monkeypatch, capsys, change, message):
    out = tmp_path / "run"
    _interrupted_fit(tiny_zoo, out, monkeypatch)
    argv = ["--zoo", str(other_zoo if change == "zoo" else tiny_zoo), "--out", str(out), *TINY_FIT]
    if change != "zoo":
        argv.append(change)
    assert run_cli(fit_main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and "was left by another fit" in err and err.count("\n") == 1
    assert not (out / "model.pt").exists()


def test_a_crafted_checkpoint_runs_no_code_even_when_the_environment_asks(tiny_zoo, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupted_fit(tiny_zoo, out, monkeypatch)
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": Payload(marker)}, out / "checkpoints" / "last.ckpt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert run_cli(fit_main, ["--zoo", str(tiny_zoo), "--out", str(out), *TINY_FIT]) == 2
    assert "is not a readable fit checkpoint" in capsys.readouterr().err
    assert not marker.exists()
    (out / "model.pt").write_bytes(pickle.dumps(Payload(marker)))  # a crafted model.pt at every reader
    for argv in (["--zoo", str(tiny_zoo), "--model", str(out)],):
        assert run_cli(embed_main, argv + ["--out", str(tmp_path / "e.h5")]) == 2
        assert "is not a readable hyperrep model" in capsys.readouterr().err
    assert not marker.exists()


# ---- 2. one commit point per output ----

def test_build_overwrite_killed_between_hdf5_and_table_reads_the_new_zoo(tmp_path, monkeypatch):
    out = tmp_path / "z.h5"
    assert run_cli(build_main, TINY + ["--out", str(out), "--quiet", "grid.lr=[0.003]"]) == 0
    monkeypatch.setattr("zoo.writer.write_table", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # the kill point: after the HDF5 rename, before the table
        build(tiny_config("grid.lr=[0.03]"), out, overwrite=True, progress=False)
    monkeypatch.undo()
    with zoo.open(out) as z:
        assert set(z.field("lr")) == {0.03}
        assert set(z.table.column("lr").to_pylist()) == {0.03}  # the stale table (lr 0.003) is not paired
    assert run_cli(table_main, [str(out)]) == 0  # and it can be derived again in place
    with h5py.File(out) as f:
        assert zoo.store.table_build_id(out.with_suffix(".parquet")) == f.attrs["build_id"]


def test_fit_overwrite_killed_after_the_model_leaves_a_loadable_run(tiny_zoo, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(FitConfig, None, TINY_FIT + ["epochs=1", f"zoo={tiny_zoo}", f"out={out}"])
    fit_run(cfg)
    real = zoo.io.atomic_path

    def die_on_yaml(path):
        if str(path).endswith("hyperrep.yaml"):
            raise KeyboardInterrupt
        return real(path)
    monkeypatch.setattr("hyperrep._fit.atomic_path", die_on_yaml)
    with pytest.raises(KeyboardInterrupt):
        fit_run(load_config(FitConfig, None, TINY_FIT + ["epochs=1", "d_latent=4", f"zoo={tiny_zoo}", f"out={out}"]),
                overwrite=True)
    monkeypatch.undo()
    module, meta = load_run(out)  # the metadata travels inside model.pt: the new run, whole
    assert module.cfg.d_latent == 4 and meta["config"]["d_latent"] == 4


def test_embed_killed_before_its_hdf5_rename_keeps_the_old_embeddings(tiny_zoo, tmp_path, monkeypatch):
    run = fit_run(load_config(FitConfig, None, TINY_FIT + ["epochs=1", f"zoo={tiny_zoo}", f"out={tmp_path / 'r'}"]))
    out = embed_zoo(tiny_zoo, run, tmp_path / "e.h5", progress=False, device="cpu")
    before = h5py.File(out, "r")["embeddings"][:]
    monkeypatch.setattr("hyperrep.embeddings.h5py.File", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        embed_zoo(tiny_zoo, run, out, overwrite=True, progress=False, device="cpu")
    monkeypatch.undo()
    from hyperrep.embeddings import Embeddings
    assert np.array_equal(Embeddings.open(out).embeddings, before, equal_nan=True)
    assert not list(tmp_path.glob("*.tmp"))


# ---- 3. one writer per output ----

def test_two_concurrent_builds_of_one_output(tmp_path):
    out = tmp_path / "z.h5"
    slow = TINY + ["epochs=6", "checkpoints=[0,6]", "population_size=2", "--out", str(out), "--quiet"]
    first = subprocess.Popen([sys.executable, "-m", "zoo.build", *slow], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "z.h5.lock"
    for _ in range(600):
        if lock.exists() and lock.read_text().strip():
            break
        time.sleep(0.1)
    second = subprocess.run([sys.executable, "-m", "zoo.build", *slow], capture_output=True, text=True)
    assert second.returncode == 2 and second.stderr.count("\n") == 1
    assert f"being written by another process (pid {first.pid})" in second.stderr
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    with zoo.open(out) as z:
        assert z.done.all() and z.table.num_rows == 32
    assert not lock.exists()


# ---- 4. exploded members are flagged and excluded downstream ----

def test_exploded_members_are_flagged_and_excluded(tmp_path):
    out = build(tiny_config("grid.lr=[1000.0,0.01]", "grid.optimizer=[sgd,adam]"), tmp_path / "d.h5",
                progress=False)
    with zoo.open(out) as z:
        lr, div = z.field("lr"), z.diverged
        assert div[lr > 1].all() and not div[lr < 1].any()
        assert np.isnan(z.file["weights"][np.flatnonzero(div), -1]).all()
        assert not z.usable()[div].any()
    from probes.features import load_probe_data
    data = load_probe_data([out])
    assert set(data.rows["lr"]) == {0.01}


# ---- 5. every bad input: one line, exit 2, nothing written ----

def _npz(tmp_path, name, **over):
    x = np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8)
    arrays = dict(x_train=x, y_train=np.arange(40) % 4, x_test=x[:10], y_test=np.arange(10) % 4)
    arrays.update(over)
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return f"dataset=npz:{path}"


NPZ_CASES = {
    "huge label": (dict(y_train=np.r_[np.arange(39) % 4, 10**6]), "must lie in [0, 1024)"),
    "fractional labels": (dict(y_train=np.arange(40) / 3), "must be integer class ids"),
    "negative label": (dict(y_train=np.r_[np.arange(39) % 4, -1]), "must lie in [0, 1024)"),
    "2-D labels": (dict(y_train=np.zeros((40, 2), int)), "must be one label per image"),
    "short labels": (dict(y_train=np.arange(30) % 4), "must be one label per image"),
    "empty": (dict(x_train=np.zeros((0, 8, 8), np.uint8), y_train=np.zeros(0, int)), "must be non-empty uint8"),
    "object array": (dict(y_train=np.array([1, "a"] * 20, dtype=object)), "not a readable .npz of plain arrays"),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_bad_npz_datasets(case, tmp_path, capsys):
    over, message = NPZ_CASES[case]
    data = tmp_path / "data"
    data.mkdir()
    argv = TINY + [_npz(data, "d", **over), "--out", str(tmp_path / "out" / "z.h5"), "--quiet"]
    assert run_cli(build_main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _cases(tiny_zoo, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    partial = tmp_path / "partial.h5"
    with h5py.File(partial, "w") as f:
        f.attrs["format"] = "weightzoo-zoo/1"
        f.attrs["architecture"] = "cnn_gap"
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(tiny_zoo.read_bytes()[:5000])
    (tmp_path / "dir.h5").mkdir()
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("epochs: !!python/object/apply:os.system ['touch PWNED']\n")
    z = str(tiny_zoo)
    return [
        (build_main, ["population_size=-1"], "'population_size' must be in [0, inf)"),
        (build_main, ["--max-populations", "-1"], "--max-populations must be >= 1"),
        (build_main, ["val_fraction=1.0"], "'val_fraction' must be in [0, 1)"),
        (build_main, ["fixed.class_subset='11,12'"], "class_subset names class 11, but dataset digits has"),
        (build_main, ["--config", str(tagged)], "is not valid YAML"),
        (build_main, ["--out", str(tmp_path / "dir.h5")], "is a directory"),
        (build_main, ["device=cuda"] if not torch.cuda.is_available() else ["device=tpu"], "device"),
        (fit_main, ["--zoo", z, "epochs=-1"], "'epochs' must be in [1, inf)"),
        (fit_main, ["--zoo", z, "batch_size=0"], "'batch_size' must be in [2, inf)"),
        (fit_main, ["--zoo", z, "lr=-1"], "'lr' must be in (0, inf)"),
        (fit_main, ["--zoo", z, "precision=fp8"], "'precision' must be one of"),
        (fit_main, ["--zoo", str(partial)], "is a damaged zoo: it lacks"),
        (fit_main, ["--zoo", str(trunc)], "cannot open zoo"),
        (fit_main, ["--zoo", str(text)], "cannot open zoo"),
        (fit_main, ["--zoo", z, "splits=[1.0,0.0,0.0]"], "the val split of"),
        *([(fit_main, ["--zoo", z, "accelerator=gpu"], "no CUDA GPU is visible")] if not torch.cuda.is_available()
          else []),
        (embed_main, ["--zoo", z, "--batch-size", "0"], "'batch_size' must be in [1, inf)"),
        (embed_main, ["--zoo", z, "--model", str(tmp_path)], "not a fitted hyperrep run"),
        (probes_main, ["--zoo", z, "--test-fraction", "1.5"], "'test_fraction' must be in (0, 1)"),
        (probes_main, ["--zoo", z, "--test-fraction", "0"], "'test_fraction' must be in (0, 1)"),
        (probes_main, ["--zoo", z, "--checkpoints", "99"], "checkpoint slot 99 is out of range"),
        (probes_main, ["--zoo", z, "--bootstrap", "-1"], "'bootstrap' must be in [0, inf)"),
        (probes_main, ["--zoo", z, "--out", str(text)], "is a file"),
        (probes_main, ["--zoo", z, z], "is listed twice"),
        (probes_main, ["--zoo", z, "--embeddings", str(text)], "not a readable embeddings file"),
        (join_main, [str(tmp_path / "j.h5"), str(trunc)], "not a readable HDF5 zoo"),
        (join_main, [str(tmp_path / "j.h5"), z, z], "listed twice"),
    ]


def test_every_bad_input_is_one_clear_line_and_writes_nothing(tiny_zoo, tmp_path, capsys):
    cases = _cases(tiny_zoo, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    failures = []
    for main, argv, message in cases:
        out = ["--out", str(tmp_path / "o.h5")] if main is build_main and "--out" not in argv else []
        out = out or (["--out", str(tmp_path / "o")] if main in (fit_main, probes_main) and "--out" not in argv else [])
        code = run_cli(main, argv + out + (["--quiet"] if main is build_main else []))
        err = capsys.readouterr().err
        if code != 2 or message not in err or err.count("\n") != 1 or "weights_only=False" in err:
            failures.append((argv, code, err))
    assert not failures, failures
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no empty run directory
    assert not (tmp_path / "PWNED").exists() and not os.path.exists("PWNED")
    print(f"{len(cases)} kinds of bad input, all one line and exit 2")


def test_yaml_tags_and_configs_never_construct_objects(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("!!python/object/apply:os.system ['touch PWNED']\n")
    with pytest.raises(zoo.UsageError, match="is not valid YAML"):
        load_config(zoo.ZooConfig, cfg)
    assert yaml.safe_load("a: 1") == {"a": 1}
