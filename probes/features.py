"""Probe inputs from zoo files: rows = (member, checkpoint) pairs; features W, s(W), embeddings; targets.

s(W) follows Unterthiner et al. 2020: for every layer tensor (weights and biases separately) the mean,
variance and the 0/25/50/75/100 % quantiles.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import zoo
from hyperrep.embeddings import Embeddings
from zoo import Layout, UsageError

STAT_NAMES = ("mean", "var", "q0", "q25", "q50", "q75", "q100")
METRIC_TARGETS = ("test_acc", "train_acc", "gen_gap", "epoch", "test_loss", "train_loss", "sparsity",
                  "test_a_acc", "test_b_acc", "forgetting")  # the last three: continual sequence zoos
HPARAM_TARGETS = ("lr", "weight_decay", "dropout", "init", "init_scale", "activation", "optimizer", "batch_size",
                  "prune_fraction", "train_fraction", "label_noise", "class_subset", "mem_neurons", "memoria")
LOG_TARGETS = ("lr", "weight_decay", "init_scale")  # drawn log-uniformly over decades in the zoos
# trained_classes: which classes a member trained on (its class_subset; all when empty), one binary label each
# sequence zoos: grokked (modular: test_acc >= 0.9 at that checkpoint), first_token (memorize: the first token of
# the sequence the member memorised), memory_kind (gpt_t: none, neurons, memoria or neurons+memoria)
SEQUENCE_TARGETS = ("grokked", "first_token", "memory_kind")
ALL_TARGETS = METRIC_TARGETS + HPARAM_TARGETS + ("trained_classes", "dataset") + SEQUENCE_TARGETS


@dataclass
class ProbeData:
    rows: pd.DataFrame  # one row per usable (zoo, member, checkpoint): ids, targets
    W: np.ndarray  # (n_rows, n_params) float32
    sW: np.ndarray  # (n_rows, n_stats) float32
    emb: np.ndarray | None  # (n_rows, d_latent) or None
    emb_split: np.ndarray | None  # per row: the hyperrep fit's member split (0 train, 1 val, 2 test)
    stat_names: list[str]
    fixed_test: np.ndarray | None = None  # per row: in the test split of a given split file
    emb_seq: np.ndarray | None = None  # (n_rows, n_tokens * d_latent): every token's latent, when all files have it


def weight_stats(W: np.ndarray, layout: Layout) -> tuple[np.ndarray, list[str]]:
    """(n, P) -> (n, 7 x n_tensors) statistics per layer tensor."""
    cols, names = [], []
    for e in layout:
        block = W[:, e.slice].astype(np.float64)
        q = np.quantile(block, [0, 0.25, 0.5, 0.75, 1.0], axis=1).T
        cols.append(np.column_stack([block.mean(1), block.var(1), q]))
        names += [f"{e.name}.{s}" for s in STAT_NAMES]
    return np.concatenate(cols, 1).astype(np.float32), names


def _rows_of(z: zoo.Zoo, zoo_index: int) -> pd.DataFrame:
    t = z.table.to_pandas()
    t = t[~t["diverged"] & np.isfinite(t["test_acc"])]
    t = t[z.done[t["model_id"].to_numpy()]].copy()
    if "train_acc" in t:  # imported zoos may not have recorded it
        t["gen_gap"] = t["train_acc"] - t["test_acc"]
    t["zoo"] = zoo_index
    t["member"] = zoo_index * 10**7 + t["model_id"]  # unique across zoos, for member splits
    t["trained_classes"] = t["class_subset"].astype(str) if "class_subset" in t else ""
    t["num_classes"] = z.num_classes
    _sequence_targets(z, t)
    return t.reset_index(drop=True)


def _sequence_targets(z: zoo.Zoo, t: pd.DataFrame) -> None:
    """grokked and first_token, for zoos of generated sequence data (their data is re-made from the config)."""
    kw = z.architecture_kwargs
    if z.architecture == "gpt_t" and "mem_neurons" in t:
        neurons = (t["mem_neurons"].replace(-1, kw.get("fc_mem_dim", 0)) > 0) & (kw.get("fc_mem_dim", 0) > 0)
        memoria = t["memoria"].astype(bool) & bool(kw.get("memoria", False)) if "memoria" in t else False
        t["memory_kind"] = np.select([neurons & memoria, neurons, memoria], ["neurons+memoria", "neurons", "memoria"],
                                     "none")
    if z.config.get("dataset") != "sequence":
        return
    from zoo.sequences import SequenceSpec, make_sequences
    spec = SequenceSpec.of(z.config.get("sequence"))
    if spec.task == "modular":
        t["grokked"] = (t["test_acc"] >= 0.9).astype(int)
    if spec.task == "memorize" and (t["class_subset"].astype(str) != "").all():
        data = make_sequences(spec)
        first = {int(g): int(data.x_train[int(i), 0]) for i, g in  # the first window of each sequence
                 zip(*np.unique(data.groups_train.numpy(), return_index=True)[::-1])}
        t["first_token"] = [first[int(str(c).split(",")[0])] for c in t["class_subset"]]


def _sequence(e: Embeddings, rows: pd.DataFrame) -> np.ndarray:
    """(n_rows, n_tokens * d_latent) token latents of the rows."""
    return e.sequence[rows["model_id"].to_numpy(), rows["checkpoint"].to_numpy()].reshape(len(rows), -1)


def _embeddings(e: Embeddings, z: zoo.Zoo, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    if e.embeddings.shape[:2] != (z.n_models, z.n_checkpoints):
        raise UsageError(f"{e.path} holds embeddings for {e.embeddings.shape[0]} x {e.embeddings.shape[1]} (member, "
                         f"checkpoint) pairs but {z.path} has {z.n_models} x {z.n_checkpoints}: "
                         f"embeddings of another zoo")
    ids = rows["model_id"].to_numpy()
    return e.embeddings[ids, rows["checkpoint"].to_numpy()], e.split[ids]


def check_one_encoder(encoders: list[Embeddings]) -> None:
    """Embeddings of several zoos must come from one frozen encoder, or a probe can tell the zoos apart by
    which encoder produced a vector."""
    first = encoders[0]
    for e in encoders[1:]:
        if e.model_sha256 != first.model_sha256 or not e.model_sha256:
            raise UsageError(f"{first.path} and {e.path} come from different encoders ({first.model or '?'} "
                             f"vs {e.model or '?'}, model.pt sha256 {first.model_sha256[:12] or 'unknown'} vs "
                             f"{e.model_sha256[:12] or 'unknown'}); embed every zoo with one hyperrep run")


def load_probe_data(zoo_paths: list[str | Path], embedding_paths: list[str | Path] | None = None,
                    checkpoints: list[int] | None = None, split_file: str | Path | None = None) -> ProbeData:
    """Rows, features and targets of one or several zoos of one architecture."""
    if embedding_paths and len(embedding_paths) != len(zoo_paths):
        raise UsageError(f"got {len(embedding_paths)} --embeddings for {len(zoo_paths)} --zoo; give one per zoo")
    encoders = [Embeddings.open(p) for p in embedding_paths or []]
    if len(encoders) > 1:
        check_one_encoder(encoders)
    frames, Ws, embs, splits, layout, arch = [], [], [], [], None, None
    seqs = [] if encoders and all(e.sequence is not None for e in encoders) else None
    for i, p in enumerate(zoo_paths):
        with zoo.open(p) as z:
            if arch is not None and (z.architecture, z.layout) != (arch, layout):
                raise UsageError(f"{p} holds {z.architecture} members; probing several zoos needs one "
                                 f"architecture ({arch})")
            arch, layout = z.architecture, z.layout
            bad = [c for c in checkpoints or [] if not -z.n_checkpoints <= c < z.n_checkpoints]
            if bad:
                raise UsageError(f"checkpoint slot {bad[0]} is out of range: {p} has slots 0..{z.n_checkpoints - 1}")
            rows = _rows_of(z, i)
            if checkpoints:
                slots = [c % z.n_checkpoints for c in checkpoints]
                rows = rows[rows["checkpoint"].isin(slots)].reset_index(drop=True)
            Ws.append(z.weight_items(rows["model_id"].to_numpy(), rows["checkpoint"].to_numpy()))
            if encoders:
                e, s = _embeddings(encoders[i], z, rows)
                embs.append(e)
                splits.append(s)
                if seqs is not None:
                    seqs.append(_sequence(encoders[i], rows))
            frames.append(rows)
    rows = pd.concat(frames, ignore_index=True)
    W = np.concatenate(Ws)
    ok = np.isfinite(W).all(1)
    if encoders:
        emb, split = np.concatenate(embs), np.concatenate(splits)
        ok &= np.isfinite(emb).all(1)
    rows, W = rows[ok].reset_index(drop=True), W[ok]
    if not len(rows):
        raise UsageError(f"no usable (member, checkpoint) rows in {', '.join(map(str, zoo_paths))}")
    sW, names = weight_stats(W, layout)
    fixed = test_rows(rows, split_file) if split_file else None
    seq = np.concatenate(seqs)[ok] if seqs is not None else None
    return ProbeData(rows, W, sW, emb[ok] if encoders else None, split[ok] if encoders else None, names, fixed, seq)


def fit_members_only(data: ProbeData) -> ProbeData:
    """The rows of members the hyper-representation was fitted on (train, val or test of its split): a probe on
    an encoder fitted on part of a zoo (FitConfig.max_members, a zoo-size curve) then sees the same members."""
    if data.emb_split is None:
        raise UsageError("members=fit needs embeddings (the encoder's split says which members it was fitted on)")
    keep = data.emb_split >= 0
    if not keep.any():
        raise UsageError("no row belongs to a member of the encoder's fit; were the embeddings made by another run?")
    pick = lambda a: None if a is None else a[keep]
    return dataclasses.replace(data, rows=data.rows[keep].reset_index(drop=True), W=data.W[keep], sW=data.sW[keep],
                               emb=pick(data.emb), emb_split=data.emb_split[keep], fixed_test=pick(data.fixed_test),
                               emb_seq=pick(data.emb_seq))


def test_rows(rows: pd.DataFrame, split_file: str | Path) -> np.ndarray:
    """Rows in the test split of a split file: JSON {"test_members": [member ids]} (probes' own split.json)."""
    path = Path(split_file)
    if not path.is_file():
        raise UsageError(f"split file {path} does not exist")
    try:
        members = json.loads(path.read_text())["test_members"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"split file {path} is not JSON with a 'test_members' list") from None
    return rows["member"].isin(set(int(m) for m in members)).to_numpy()


def trained_classes(rows: pd.DataFrame, num_classes: int = 10) -> np.ndarray:
    """(n, K) int: 1 where the member's training set holds the class (its class_subset, every class if empty)."""
    out = np.ones((len(rows), num_classes), np.int64)
    for i, subset in enumerate(rows["class_subset"].astype(str)):
        if subset.strip():
            out[i] = 0
            out[i, [int(c) for c in subset.split(",")]] = 1
    return out


def target_kind(values: pd.Series, name: str, regress: tuple[str, ...] = ()) -> str | None:
    """'continuous', 'categorical', 'multilabel', or None when the target does not vary. A numeric target named
    in `regress` is continuous even with few values (HR21 regresses train fraction, dropout and lr)."""
    if name == "trained_classes":
        return "multilabel" if values.nunique(dropna=True) >= 2 else None
    if values.nunique(dropna=True) < 2:
        return None
    if name in regress and values.dtype.kind not in "fiu":
        raise UsageError(f"target '{name}' holds {values.dtype} values and cannot be regressed; "
                         f"remove it from regress")
    if name in METRIC_TARGETS or name in regress:
        return "continuous"
    if values.dtype.kind in "OSUb" or values.nunique() <= 10:
        return "categorical"
    return "continuous"


def target_values(rows: pd.DataFrame, name: str, kind: str) -> np.ndarray:
    if kind == "multilabel":
        return trained_classes(rows, int(rows["num_classes"].max()) if "num_classes" in rows else 10)
    v = rows[name]
    if kind == "categorical":
        return v.astype(str).to_numpy()
    v = v.to_numpy(np.float64)
    if name in LOG_TARGETS and (v > 0).all() and v.max() / v.min() > 100:  # decades apart: regress log10
        return np.log10(v)
    return v
