"""The field's formats out: Hugging Face datasets, safetensors members, a torch Dataset over a zoo."""
import json

import numpy as np
import pytest
import torch

import zoo
from zoo.cli import run_cli
from zoo.export import main as export_main


def test_hf_export_loads_with_datasets_and_matches_the_zoo(tiny_zoo, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "hf_export"
    assert run_cli(export_main, [str(tiny_zoo), "--format", "hf", "--out", str(out), "--quiet"]) == 0
    ds = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train")
    with zoo.open(tiny_zoo) as z:
        assert len(ds) == z.n_models * z.n_checkpoints and "weights" in ds.column_names
        row = ds[7]
        assert np.array_equal(np.asarray(row["weights"], np.float32), z.weights(row["model_id"], row["checkpoint"]))
        assert row["lr"] == z.hparams(row["model_id"]).lr and row["test_acc"] == pytest.approx(
            float(z.metric("test_acc")[row["model_id"], row["checkpoint"]]))
        assert zoo.Layout.from_json((out / "layout.json").read_text()) == z.layout
    assert "data_files" in (out / "README.md").read_text() and not (tmp_path / "hf_export.partial").exists()


def test_safetensors_members_carry_their_hyperparameters(tiny_zoo, tmp_path):
    st = pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    out = tmp_path / "st"
    assert run_cli(export_main, [str(tiny_zoo), "--format", "safetensors", "--out", str(out), "--checkpoint", "1",
                                 "--quiet"]) == 0
    files = sorted(out.glob("member_*.safetensors"))
    with zoo.open(tiny_zoo) as z:
        assert len(files) == z.n_models
        state = load_file(str(files[3]))
        with st.safe_open(str(files[3]), "pt") as f:
            meta = f.metadata()
        assert json.loads(meta["hparams"]) == vars(z.hparams(3)) and meta["epoch"] == str(int(z.epochs[1]))
        assert json.loads(meta["metrics"])["test_acc"] == pytest.approx(float(z.metric("test_acc")[3, 1]))
        net = zoo.ModelSpec.from_attrs(json.loads(meta["spec"])).create(json.loads(meta["hparams"])["activation"])
        net.load_state_dict(state)
        ref = z.model(3, 1)
        x = torch.randn(4, *z.input_shape)
        with torch.no_grad():
            assert torch.equal(net.eval()(x), ref(x))


def test_torch_dataset_over_a_zoo(tiny_zoo):
    ds = zoo.ZooDataset(tiny_zoo, targets=("test_acc", "lr"), checkpoints=[-1])
    with zoo.open(tiny_zoo) as z:
        assert len(ds) == z.n_models
        w, t = ds[2]
        m = int(ds.rows.iloc[2]["model_id"])
        assert torch.equal(w, torch.from_numpy(z.weights(m, -1))) and t["lr"] == z.hparams(m).lr
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    batch_w, batch_t = next(iter(loader))
    assert batch_w.shape == (5, w.numel()) and batch_t["test_acc"].shape == (5,)
    with pytest.raises(zoo.UsageError, match="has no column 'accuracy'"):
        zoo.ZooDataset(tiny_zoo, targets=("accuracy",))


def test_export_refuses_an_existing_output(tiny_zoo, tmp_path, capsys):
    assert run_cli(export_main, [str(tiny_zoo), "--format", "hf", "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
