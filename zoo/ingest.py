"""Bring the field's zoos into weightzoo: a Small CNN Zoo directory or a Model Zoos directory of Ray Tune
trials -> a `weightzoo-zoo/1` zoo, checked member by member against the accuracy it recorded.

    python -m zoo.ingest small-cnn-zoo data/external/mnist --out data/zoos/scz_mnist.h5 --dataset mnist
    python -m zoo.ingest model-zoos data/external/mnist_hyp_rand --out data/zoos/mz_hyp.h5 --dataset mnist
Tiny CPU run: the tests write both formats in small files (tests/test_ingest.py).

Small CNN Zoo (Unterthiner et al. 2020): `weights.npy` (rows of 4,970 floats in Keras order), `metrics.csv.gz`
(one row per weight row: `modeldir`, `step`, `config.*` hyperparameters, train/test accuracy and loss) and
`layout.csv` (`varname`, `start_idx`, `end_idx`, `shape`). Kernels are HWIO / (in, out) and become PyTorch's
OIHW / (out, in); the network is the registry's `smallcnn` (valid padding) on pixels scaled to [-1, 1].
Model Zoos (Schürholt et al. 2022): one folder per trial with `params.json` (`model::type`, `model::nlin`,
`optim::lr`, ...), `result.json` (one JSON line per epoch) and `checkpoint_<N>/checkpoints` (a state_dict,
read with `torch.load(weights_only=True)` only). `model::type` CNN is `cnn_s`, CNN3 is `cnn_l`.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm import tqdm

from .cli import UsageError, run_cli
from .config import MemberSpec
from .data import DataSpec
from .evaluation import evaluate
from .io import atomic_path, check_new_output, output_lock, safe_torch_load
from .spec import Layout, ModelSpec
from .writer import ZooWriter

FORMATS = ("small-cnn-zoo", "model-zoos")
KERAS_INITS = {"he_normal": "kaiming_normal", "he_uniform": "kaiming_uniform", "glorot_normal": "xavier_normal",
               "glorot_uniform": "xavier_uniform", "orthogonal": "orthogonal", "truncated_normal": "truncated_normal",
               "randomnormal": "normal", "random_normal": "normal", "randomuniform": "uniform",
               "random_uniform": "uniform", "variancescaling": "kaiming_normal"}
MODEL_ZOOS_ARCHS = {"CNN": ("cnn_s", 28), "CNN3": ("cnn_l", 32)}
METRIC_KEYS = {"test_acc": ("test_acc", "test_accuracy"), "train_acc": ("train_acc", "train_accuracy"),
               "test_loss": ("loss_test", "test_loss"), "train_loss": ("loss_train", "train_loss"),
               "val_acc": ("val_acc", "validation_acc"), "val_loss": ("loss_val", "val_loss")}


@dataclass
class Imported:
    """A foreign zoo in weightzoo's terms, weights read lazily member by member."""
    spec: ModelSpec
    members: list[MemberSpec]
    epochs: list[int]
    metrics: dict[str, np.ndarray]  # name -> (n_members, n_checkpoints), NaN where not recorded
    fields: dict[str, list]  # per-member provenance (source ids, raw hyperparameters that have no MemberSpec key)
    rows: callable  # member index -> (n_checkpoints, P) float32, NaN where absent
    data: dict = field(default_factory=dict)  # the data keys of the zoo config (scaling of the inputs)


# ---- Small CNN Zoo ----

def _keras_to_torch(block: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(n, prod(shape)) Keras tensors -> PyTorch order: conv HWIO -> OIHW, dense (in, out) -> (out, in)."""
    arr = block.reshape(len(block), *shape)
    if arr.ndim == 5:
        arr = arr.transpose(0, 4, 3, 1, 2)
    elif arr.ndim == 3:
        arr = arr.transpose(0, 2, 1)
    return arr.reshape(len(block), -1)


def keras_permutation(layout_csv: pd.DataFrame, layout: Layout) -> tuple[np.ndarray, list[tuple[str, tuple]]]:
    """Index map: torch_flat = keras_flat[perm]. Keras tensors are matched to the layout's in order (kernel then
    bias per layer, as both store them) and must have the same sizes."""
    rows = layout_csv.sort_values("start_idx").to_dict("records")
    if len(rows) != len(layout):
        raise UsageError(f"layout.csv has {len(rows)} tensors, the {layout.n_params}-parameter network "
                         f"{len(layout)}: not a Small CNN Zoo of this architecture")
    perm, src = np.empty(layout.n_params, np.int64), []
    for r, e in zip(rows, layout):
        shape = tuple(ast.literal_eval(str(r["shape"])))
        start, end = int(r["start_idx"]), int(r["end_idx"])
        if end - start != e.size or int(np.prod(shape)) != e.size:
            raise UsageError(f"layout.csv tensor {r['varname']} has {end - start} values, {e.name} needs {e.size}")
        idx = np.arange(start, end)[None]
        perm[e.slice] = _keras_to_torch(idx, shape)[0]
        src.append((str(r["varname"]), shape))
    return perm, src


def _hparam(row: pd.Series, key: str, default):
    v = row.get(f"config.{key}", default)
    return default if v is None or (isinstance(v, float) and np.isnan(v)) else v


def _scz_member(row: pd.Series, seed: int) -> MemberSpec:
    init = str(_hparam(row, "w_init", "he_normal"))
    if init.lower() not in KERAS_INITS:
        raise UsageError(f"unknown Keras initializer '{init}' in metrics.csv.gz; known: {', '.join(KERAS_INITS)}")
    return MemberSpec(
        seed=seed, init=KERAS_INITS[init.lower()], init_scale=float(_hparam(row, "init_std", 1.0)) or 1.0,
        activation=str(_hparam(row, "activation", "relu")).lower(),
        optimizer=str(_hparam(row, "optimizer", "adam")).lower(),
        lr=float(_hparam(row, "learning_rate", 1e-3)) or 1e-12,
        weight_decay=2.0 * float(_hparam(row, "l2reg", 0.0)),  # Keras adds l2 * |w|^2 to the loss: gradient 2 l2 w
        dropout=float(_hparam(row, "dropout", 0.0)), batch_size=int(_hparam(row, "batch_size", 32)),
        train_fraction=float(_hparam(row, "train_fraction", 1.0)) or 1.0)


def read_small_cnn_zoo(src: Path, input_size: int, channels: int = 1) -> Imported:
    for name in ("weights.npy", "metrics.csv.gz", "layout.csv"):
        if not (src / name).is_file():
            raise UsageError(f"{src} is not a Small CNN Zoo directory: {name} is missing")
    weights = np.load(src / "weights.npy", mmap_mode="r", allow_pickle=False)
    metrics = pd.read_csv(src / "metrics.csv.gz", compression="gzip")
    if len(metrics) != len(weights) or not {"modeldir", "step"} <= set(metrics.columns):
        raise UsageError(f"{src}: metrics.csv.gz must have one row (with modeldir and step) per row of weights.npy "
                         f"({len(metrics)} rows for {len(weights)} weight rows)")
    spec = ModelSpec("smallcnn", {}, (channels, input_size, input_size), 10)
    perm, _ = keras_permutation(pd.read_csv(src / "layout.csv"), spec.layout())
    metrics["row"] = np.arange(len(metrics))
    dirs = list(dict.fromkeys(metrics["modeldir"]))  # first-seen order
    epochs = sorted(int(s) for s in metrics["step"].unique())
    slot = {e: k for k, e in enumerate(epochs)}
    by_dir = {d: g.sort_values("step") for d, g in metrics.groupby("modeldir", sort=False)}
    members = []
    for i, d in enumerate(dirs):
        row = by_dir[d].iloc[-1]
        seed = int(_hparam(row, "random_seed", i)) % 2**31
        members.append(_scz_member(row, seed))
    out = {name: np.full((len(dirs), len(epochs)), np.nan, np.float32) for name in METRIC_KEYS}
    for i, d in enumerate(dirs):
        g = by_dir[d]
        for name, keys in METRIC_KEYS.items():
            col = next((k for k in keys if k in g), None)
            if col is not None:
                out[name][i, [slot[int(s)] for s in g["step"]]] = g[col].to_numpy(np.float32)
    out = {k: v for k, v in out.items() if not np.isnan(v).all() or k in ("test_acc", "test_loss")}

    def rows(i: int) -> np.ndarray:
        w = np.full((len(epochs), spec.layout().n_params), np.nan, np.float32)
        g = by_dir[dirs[i]]
        w[[slot[int(s)] for s in g["step"]]] = np.asarray(weights[g["row"].to_numpy()], np.float32)[:, perm]
        return w

    fields = {"source_modeldir": [str(d) for d in dirs],
              "source_l2reg": [float(_hparam(by_dir[d].iloc[-1], "l2reg", 0.0)) for d in dirs],
              "source_w_init": [str(_hparam(by_dir[d].iloc[-1], "w_init", "")) for d in dirs]}
    return Imported(spec, members, epochs, out, fields, rows, {"input_scaling": "minus_one_one"})


# ---- Model Zoos ----

def _checkpoints(trial: Path) -> dict[int, Path]:
    found = {}
    for d in trial.glob("checkpoint_*"):
        m = re.fullmatch(r"checkpoint_0*(\d+)", d.name)
        if m and (d / "checkpoints").is_file():
            found[int(m.group(1))] = d / "checkpoints"
    return found


def _results(trial: Path) -> dict[int, dict]:
    """training_iteration -> result line of result.json (one JSON object per line)."""
    out = {}
    path = trial / "result.json"
    for n, line in enumerate(path.read_text().splitlines() if path.is_file() else []):
        if line.strip():
            try:
                r = json.loads(line)
            except ValueError:
                raise UsageError(f"{path} line {n + 1} is not JSON") from None
            out[int(r.get("training_iteration", r.get("epoch", n + 1)))] = r
    return out


def _mz_member(p: dict, path: Path) -> MemberSpec:
    def get(key, default):
        return p.get(key, default)
    nlin = str(get("model::nlin", "tanh")).lower()
    return MemberSpec(seed=int(get("seed", 0)) % 2**31, init=str(get("model::init_type", "uniform")),
                      activation={"leakyrelu": "leaky_relu"}.get(nlin, nlin),
                      optimizer=str(get("optim::optimizer", "adam")),
                      lr=float(get("optim::lr", 1e-3)), weight_decay=float(get("optim::wd", 0.0)),
                      dropout=float(get("model::dropout", 0.0)), batch_size=int(get("training::batchsize", 10)))


def read_model_zoos(src: Path) -> Imported:
    trials = sorted(p.parent for p in src.glob("*/params.json"))
    if not trials:
        raise UsageError(f"{src} holds no Ray Tune trial folders (*/params.json); point --src at the zoo directory")
    params = []
    for t in trials:
        try:
            params.append(json.loads((t / "params.json").read_text()))
        except ValueError:
            raise UsageError(f"{t / 'params.json'} is not JSON") from None
    types = {p.get("model::type") for p in params}
    if len(types) != 1 or next(iter(types)) not in MODEL_ZOOS_ARCHS:
        raise UsageError(f"model::type must be one of {', '.join(MODEL_ZOOS_ARCHS)} for every trial, "
                         f"got {sorted(map(str, types))}")
    arch, size = MODEL_ZOOS_ARCHS[next(iter(types))]
    spec = ModelSpec(arch, {}, (int(params[0].get("model::channels_in", 1)), size, size),
                     int(params[0].get("model::o_dim", 10)))
    layout = spec.layout()
    ckpts = [_checkpoints(t) for t in trials]
    epochs = sorted(set().union(*ckpts))
    if not epochs:
        raise UsageError(f"{src}: no trial has checkpoint_<N>/checkpoints files")
    slot = {e: k for k, e in enumerate(epochs)}
    results = [_results(t) for t in trials]
    out = {name: np.full((len(trials), len(epochs)), np.nan, np.float32) for name in METRIC_KEYS}
    for i, res in enumerate(results):
        for e, r in res.items():
            if e in slot:
                for name, keys in METRIC_KEYS.items():
                    val = next((r[k] for k in keys if k in r), None)
                    out[name][i, slot[e]] = np.nan if val is None else float(val)
    out = {k: v for k, v in out.items() if not np.isnan(v).all() or k in ("test_acc", "test_loss")}

    def rows(i: int) -> np.ndarray:
        w = np.full((len(epochs), layout.n_params), np.nan, np.float32)
        for e, path in ckpts[i].items():
            w[slot[e]] = state_to_flat(safe_torch_load(path, "Model Zoos checkpoint"), layout, path)
        return w

    members = [_mz_member(p, t) for p, t in zip(params, trials)]
    return Imported(spec, members, epochs, out, {"source_trial": [t.name for t in trials]}, rows)


def state_to_flat(state, layout: Layout, path: Path) -> np.ndarray:
    """A foreign state_dict -> the layout's flat vector: tensors matched in order, shapes checked."""
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds {type(state).__name__}, not a state_dict")
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    shapes = [tuple(t.shape) for t in tensors]
    if shapes != [e.shape for e in layout]:
        raise UsageError(f"{path}: tensor shapes {shapes} do not match the architecture's {[e.shape for e in layout]}")
    return torch.cat([t.reshape(-1).float() for t in tensors]).numpy()


# ---- writing and checking ----

def fidelity(imp: Imported, data_spec: DataSpec, n: int, device: str = "cpu") -> tuple[float, int] | None:
    """Max |evaluated - recorded| test accuracy over up to n members at their last recorded checkpoint (None
    when the dataset's files are not there)."""
    try:
        data = data_spec.load(device)
    except UsageError:
        return None
    picks = [i for i in range(len(imp.members)) if np.isfinite(imp.metrics["test_acc"][i]).any()][:n]
    if not picks:
        return None
    W, rec, acts = [], [], []
    for i in picks:
        k = int(np.flatnonzero(np.isfinite(imp.metrics["test_acc"][i]))[-1])
        W.append(imp.rows(i)[k])
        rec.append(imp.metrics["test_acc"][i, k])
        acts.append(imp.members[i].activation)
    got = evaluate(imp.spec, np.stack(W), data, acts)["test_acc"]
    return float(np.nanmax(np.abs(got - np.asarray(rec)))), len(picks)


def write(imp: Imported, out: Path, config: dict, progress: bool = True) -> Path:
    metrics = list(imp.metrics)
    writer = ZooWriter.create(out, imp.spec, imp.members, imp.epochs, metrics, dataset=config["dataset"],
                              config=yaml.safe_dump(config, sort_keys=False), fields=imp.fields, background=True)
    with writer:
        for i in tqdm(range(len(imp.members)), unit="member", desc="importing", disable=not progress):
            w = imp.rows(i)
            for k in range(len(imp.epochs)):
                writer.write(np.array([i]), k, w[k:k + 1], {m: imp.metrics[m][i, k:k + 1] for m in metrics})
            writer.done(np.array([i]), np.array([not np.isfinite(w).any(1).any()]))
    return writer.commit()


@dataclass(frozen=True)
class IngestConfig:
    """What `python -m zoo.ingest` reads and how the members' data is described."""
    format: str
    src: str
    out: str
    dataset: str = "mnist"
    data_root: str = "data/datasets"
    grayscale: bool = False
    resize: int | None = None
    check: int = 50  # members whose recorded test accuracy is reproduced (when the dataset is present)
    tolerance: float = 0.02
    nfn_split: str = ""  # NFN's split CSV (shuffled row indices) -> OUT.nfn_split.json for probes.evaluate split=


def ingest(cfg: IngestConfig, progress: bool = True) -> tuple[Path, tuple[float, int] | None]:
    if cfg.format not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    src, out = Path(cfg.src), Path(cfg.out)
    if not src.is_dir():
        raise UsageError(f"source {src} is not a directory")
    if out.suffix != ".h5":
        raise UsageError(f"output path {out} must end in .h5")
    check_new_output(out, False, "zoo")
    size = cfg.resize or {"cifar10": 32, "svhn": 32, "digits": 8}.get(cfg.dataset, 28)
    imp = read_small_cnn_zoo(src, size) if cfg.format == "small-cnn-zoo" else read_model_zoos(src)
    data_keys = {"dataset": cfg.dataset, "data_root": cfg.data_root, "grayscale": cfg.grayscale, "resize": cfg.resize,
                 "val_fraction": 0.0, **imp.data}
    if cfg.format == "model-zoos" and cfg.dataset in ("mnist", "fashion_mnist"):  # torchvision Normalize of the zoos
        data_keys.update({"input_scaling": "fixed", "input_mean": [0.1307 if cfg.dataset == "mnist" else 0.2860],
                          "input_std": [0.3081 if cfg.dataset == "mnist" else 0.3530]})
    check = fidelity(imp, DataSpec.of(data_keys), cfg.check) if cfg.check else None
    if check is not None and check[0] > cfg.tolerance:
        raise UsageError(f"imported members do not reproduce their recorded test accuracy (max |diff| {check[0]:.4f} "
                         f"over {check[1]} members > {cfg.tolerance}): wrong dataset, layout or input scaling")
    config = {**data_keys, "ingest": {"format": cfg.format, "src": str(src), "checked_members": check and check[1],
                                      "max_abs_test_acc_diff": check and check[0]}}
    with output_lock(out):
        path = write(imp, out, config, progress)
        if cfg.nfn_split:
            write_nfn_split(src, Path(cfg.nfn_split), imp, out.with_suffix(".nfn_split.json"))
        return path, check


def nfn_split(metrics: pd.DataFrame, shuffled: np.ndarray, dirs: list[str]) -> dict[str, list[int]]:
    """The NFN benchmark's split (AllanYangZhou/nfn, experiments/data_utils.py) in member ids: weight rows in the
    CSV's order, only the final step kept, the second half the test set, the first half shuffled by
    random.Random(0) and cut 80 / 20 into train and val."""
    import random

    rows = metrics.iloc[shuffled]
    rows = rows[rows["step"] == rows["step"].max()].reset_index(drop=True)
    member = {d: i for i, d in enumerate(dirs)}
    ids = [member[d] for d in rows["modeldir"]]
    cut = int(0.5 * len(ids))
    trainval = list(range(cut))
    random.Random(0).shuffle(trainval)
    point = int(0.8 * len(trainval))
    return {"train_members": [ids[i] for i in trainval[:point]], "val_members": [ids[i] for i in trainval[point:]],
            "test_members": ids[cut:]}


def write_nfn_split(src: Path, csv: Path, imp: Imported, out: Path) -> None:
    if not csv.is_file():
        raise UsageError(f"split file {csv} does not exist")
    shuffled = pd.read_csv(csv, header=None).to_numpy().reshape(-1)
    metrics = pd.read_csv(src / "metrics.csv.gz", compression="gzip")
    if len(shuffled) != len(metrics) or set(shuffled) != set(range(len(metrics))):
        raise UsageError(f"{csv} is not a permutation of the {len(metrics)} weight rows of {src}")
    split = nfn_split(metrics, shuffled, imp.fields["source_modeldir"])
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(split))


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m zoo.ingest", description=__doc__.split("\n")[0])
    ap.add_argument("format", choices=FORMATS)
    ap.add_argument("src", help="the foreign zoo's directory")
    ap.add_argument("--out", required=True, help="the weightzoo zoo to write (.h5)")
    ap.add_argument("--dataset", default="mnist", help="the dataset the members were trained on")
    ap.add_argument("--data-root", default="data/datasets")
    ap.add_argument("--grayscale", action="store_true", help="CIFAR10-GS / SVHN-GS members")
    ap.add_argument("--resize", type=int, help="image size the members take, if not the dataset's own")
    ap.add_argument("--nfn-split", default="", help="NFN's split CSV: writes OUT.nfn_split.json (probes split=)")
    ap.add_argument("--check", type=int, default=50, help="members checked against their recorded accuracy (0: none)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.check < 0:
        raise UsageError(f"--check must be >= 0, got {a.check}")
    path, check = ingest(IngestConfig(a.format, a.src, a.out, a.dataset, a.data_root, a.grayscale, a.resize,
                                      a.check, nfn_split=a.nfn_split), not a.quiet)
    note = (f"; {check[1]} members reproduce their recorded test accuracy within {check[0]:.4f}" if check
            else "; recorded accuracies not checked (dataset files absent or --check 0)")
    print(f"zoo written to {path}{note}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
