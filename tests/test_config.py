from pathlib import Path

import pytest
import yaml

from zoo import UsageError
from zoo.build import DEFAULT_ZOO
from zoo.cli import load_config, to_yaml
from zoo.config import MemberSpec, ZooConfig, expand_members

ROOT = Path(__file__).resolve().parents[1]
ZOO_CONFIGS = sorted((ROOT / "configs" / "zoo").glob("*.yaml"))
FIT_CONFIGS = sorted((ROOT / "configs" / "hyperrep").glob("*.yaml"))


def test_grid_is_full_product_with_seeds():
    cfg = load_config(ZooConfig, None, ["grid.lr=[0.1,0.01]", "grid.activation=[tanh,relu,gelu]", "seeds=4"])
    members = expand_members(cfg)
    assert len(members) == 24
    assert len({(m.lr, m.activation) for m in members}) == 6
    assert len({m.seed for m in members}) == 24


def test_random_sampling_is_seeded_and_within_ranges():
    over = ["n_random=200", "random.lr={log_uniform: [0.0001, 0.1]}", "random.dropout={uniform: [0.0, 0.5]}",
            "random.init={choice: [orthogonal, normal]}", "random.batch_size={int_uniform: [16, 32]}"]
    a = expand_members(load_config(ZooConfig, None, over))
    b = expand_members(load_config(ZooConfig, None, over))
    c = expand_members(load_config(ZooConfig, None, over + ["seed=5"]))
    assert a == b and a != c and len(a) == 200
    assert all(1e-4 <= m.lr <= 0.1 and 0 <= m.dropout <= 0.5 and 16 <= m.batch_size <= 32 for m in a)
    assert {m.init for m in a} == {"orthogonal", "normal"}
    lrs = sorted(m.lr for m in a)
    assert lrs[100] < 0.01  # log-uniform: the median is near 10^-2.5, far below the uniform median 0.05


@pytest.mark.parametrize("override,message", [
    (["epoch=3"], "unknown config key 'epoch'"),
    (["grid.learning_rate=[0.1]"], "unknown hyperparameter 'learning_rate' in grid"),
    (["epochs=two"], "'epochs' must be an integer"),
    (["checkpoints=[0,9]"], r"checkpoints must be increasing epochs in \[0, epochs=8\]"),
    (["fixed.activation=swish"], "'activation' must be one of"),
    (["random.lr={normal: [0, 1]}", "n_random=2"], "random.lr must be one of"),
    (["epochs"], "not of the form key=value"),
])
def test_bad_config_values_fail_with_the_key(override, message):
    with pytest.raises(UsageError, match=message):
        expand_members(load_config(ZooConfig, None, override))


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dataset: digits\nepocs: 3\n")
    with pytest.raises(UsageError, match=f"unknown config key 'epocs' in {p}"):
        load_config(ZooConfig, p)


def test_config_round_trips_through_yaml():
    cfg = load_config(ZooConfig, None, ["grid.lr=[0.1]", "architecture_kwargs.width=8"])
    again = load_config(ZooConfig, None, [], yaml.safe_load(to_yaml(cfg)))
    assert again == cfg


def test_default_yaml_is_the_embedded_default():
    assert yaml.safe_load((ROOT / "configs/zoo/default.yaml").read_text()) == DEFAULT_ZOO
    members = expand_members(load_config(ZooConfig, None, [], DEFAULT_ZOO))
    assert len(members) >= 200 and len(load_config(ZooConfig, None, [], DEFAULT_ZOO).checkpoints) >= 4
    for hp in ("init", "activation", "optimizer", "lr", "dropout", "seed"):
        assert len({getattr(m, hp) for m in members}) > 1, hp


def test_shipped_configs_are_found():
    names = {p.name for p in ZOO_CONFIGS}
    assert {"default.yaml", "mnist_cnn_s_seed.yaml", "mnist_cnn_s_hyp.yaml", "mnist_smallcnn_random.yaml"} <= names


@pytest.mark.parametrize("path", ZOO_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    members = expand_members(load_config(ZooConfig, path))
    assert members
    expected = {"_seed.": 1000, "_hyp.": 2560}
    for key, n in expected.items():
        if key in path.name:
            assert len(members) == n


def test_member_spec_validation():
    with pytest.raises(UsageError, match="'dropout' must be in"):
        MemberSpec(dropout=1.0)
    with pytest.raises(UsageError, match="class_subset"):
        MemberSpec(class_subset="cats")


@pytest.mark.parametrize("path", FIT_CONFIGS, ids=lambda p: p.name)
def test_shipped_fit_configs_load(path):
    from hyperrep import FitConfig

    assert FIT_CONFIGS and all(z.endswith(".h5") for z in load_config(FitConfig, path).zoo_paths)


@pytest.mark.parametrize("override,message", [
    (["precision=bf15"], "'precision' must be one of auto, 32-true"),
    (["lr=-1"], r"'lr' must be in \(0, inf\)"),
    (["epochs=0"], r"'epochs' must be in \[1, inf\)"),
    (["batch_size=0"], r"'batch_size' must be in \[2, inf\)"),
    (["splits=[0.5,0.6,-0.1]"], r"'splits\[2\]' must be in \[0, 1\]"),
    (["checkpoints=[-1]"], r"'checkpoints\[0\]' must be in \[0, inf\)"),
    (["lr=.nan"], "'lr' must be a finite number"),
])
def test_fit_config_values_are_validated_like_every_stage(override, message):
    from hyperrep import FitConfig

    with pytest.raises(UsageError, match=message):
        load_config(FitConfig, None, override)


@pytest.mark.parametrize("override,message", [
    (["population_size=-1"], r"'population_size' must be in \[0, inf\)"),
    (["val_fraction=1.0"], r"'val_fraction' must be in \[0, 1\)"),
    (["precision=fp16"], "'precision' must be one of fp32, bf16"),
    (["conv=cudnn"], "'conv' must be one of auto, grouped, unfold, fused"),
    (["n_random=3", "random.lr={log_uniform: [0, 1]}"], "log_uniform needs low > 0"),
    (["grid.lr=[]"], "grid.lr must be a non-empty list"),
])
def test_zoo_config_numeric_options_are_validated(override, message):
    with pytest.raises(UsageError, match=message):
        load_config(ZooConfig, None, override)
