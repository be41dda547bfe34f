"""New networks from a hyper-representation, and whether they are new (CLI: hyperrep.sample).

A kernel density over the latents of the best training members (anchors) is sampled, decoded and optionally
subsampled; the sampled members, members trained from scratch, the zoo's own top members, held-out trained
members and three baselines (Gaussian noise on training weights, averages of training members, a per-coordinate
Gaussian fitted to them) are fine-tuned side by side and written as one zoo, with each member's group. The
memorization test compares every group with the hyperrep's training members, in weight space (nearest L2,
raw and after weight matching) and in function space (wrong-prediction IoU, prediction agreement).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm import tqdm

import zoo
from zoo import MemberSpec, Permuter, UsageError, ZooWriter
from zoo.build import resolve_device
from zoo.cli import to_dict
from zoo.compare import agreement, error_iou, nearest
from zoo.data import DataSpec
from zoo.io import atomic_path, check_new_output, output_lock, save_figure
from zoo.population import Population, init_flat, train_and_record

from ._fit import load_run
from ._reconstruct import batched, check_compatible, resolve_slots, run_split
from .config import SampleConfig
from .embeddings import TEST, TRAIN, file_sha256

DATA_KEYS = ("dataset", "data_root", "grayscale", "resize", "val_fraction")


def selection_metric(z: zoo.Zoo, slot: int) -> tuple[str, np.ndarray]:
    """What ranks members without looking at the test set: validation accuracy if the zoo has a validation
    split, else training accuracy."""
    name = "val_acc" if "val_acc" in z.metric_names else "train_acc"
    return name, z.metric(name)[:, slot]


def choose_anchors(z: zoo.Zoo, train_ids: np.ndarray, slot: int, top: float) -> tuple[np.ndarray, str]:
    """The best `top` fraction of the training members (one activation: the most common among them)."""
    _, score = selection_metric(z, slot)
    acts = np.asarray(z.activations())
    ranked = train_ids[np.argsort(-score[train_ids], kind="stable")]
    best = ranked[:max(1, int(round(top * len(ranked))))]
    activation = Counter(acts[best]).most_common(1)[0][0]
    return best[acts[best] == activation], activation


def draw_latents(Z: torch.Tensor, n: int, mode: str, bandwidth: float, g: torch.Generator) -> torch.Tensor:
    """n draws from a Gaussian KDE over anchor latents Z (A, T, d). mode "token": each token's latent from a
    KDE over the anchors' latents at that token (anchors mix); "joint": one anchor per draw for all tokens.
    Kernel width: `bandwidth` x each latent's spread over the anchors (0: Scott's rule, A^(-1/(d+4)))."""
    A, T, d = Z.shape
    h = bandwidth or A ** (-1.0 / (d + 4))
    spread = Z.std(0, unbiased=False) if A > 1 else torch.zeros_like(Z[0])  # (T, d)
    pick = torch.randint(0, A, (n, T) if mode == "token" else (n, 1), generator=g).expand(n, T)
    base = Z[pick, torch.arange(T)[None, :]]  # (n, T, d)
    return base + h * spread * torch.randn(base.shape, generator=g)


def _rows(z: zoo.Zoo, ids: np.ndarray, slot: int) -> np.ndarray:
    return z.weight_rows(ids, slot) if len(ids) else np.zeros((0, z.n_params), np.float32)


def _selection_images(data, n: int, seed: int):
    """Held-out images for subsampling: the validation split, else a seeded sample of training images."""
    if data.x_val is not None:
        return data.x_val[:n], data.y_val[:n]
    idx = torch.from_numpy(np.sort(np.random.default_rng(seed).permutation(len(data.y_train))[:n]))
    return data.x_train[idx.to(data.x_train.device)], data.y_train[idx.to(data.y_train.device)]


def subsample(spec, W: np.ndarray, activation: str, data, n: int, cfg: SampleConfig) -> np.ndarray:
    """Keep the n of W (k*n, P) with the best accuracy on held-out training images (never test images)."""
    if len(W) == n:
        return W
    x, y = _selection_images(data, cfg.select_images, cfg.seed)
    sel = dataclasses.replace(data, x_test=x, y_test=y)
    acc = zoo.evaluate(spec, W, sel, [activation] * len(W))["test_acc"]
    return W[np.argsort(-np.nan_to_num(acc, nan=-1.0), kind="stable")[:n]]


def baseline_groups(z: zoo.Zoo, train_ids, anchors, slot: int, cfg: SampleConfig, rng) -> dict[str, np.ndarray]:
    """The baselines every generator must beat, n members each: Gaussian noise (each sigma) on anchor
    weights, the average of `average_of` random training members, a per-coordinate Gaussian fitted to the
    training members."""
    out = {}
    if "noise" in cfg.groups:
        base = _rows(z, rng.choice(anchors, cfg.n), slot)
        for sigma in cfg.noise:
            out[f"noise_{sigma:g}"] = base + sigma * rng.standard_normal(base.shape).astype(np.float32)
    W_train = _rows(z, train_ids, slot)
    if "average" in cfg.groups:
        picks = [rng.choice(len(train_ids), min(cfg.average_of, len(train_ids)), replace=False) for _ in range(cfg.n)]
        out[f"average_{cfg.average_of}"] = np.stack([W_train[p].mean(0) for p in picks])
    if "gaussian" in cfg.groups:
        mu, sd = W_train.mean(0), W_train.std(0)
        out["gaussian"] = (mu + sd * rng.standard_normal((cfg.n, z.n_params))).astype(np.float32)
    return out


def build_groups(module, z: zoo.Zoo, split: np.ndarray, slot: int, cfg: SampleConfig, device, data):
    """{group: (weights (n, P) at fine-tuning epoch 0 or None for fresh inits, source member ids or -1)} and
    the anchors' activation and recipe."""
    usable = z.usable([slot])
    train_ids, held = np.flatnonzero((split == TRAIN) & usable), np.flatnonzero((split == TEST) & usable)
    if not len(train_ids):
        raise UsageError(f"the run has no usable training members at checkpoint slot {slot}")
    anchors, activation = choose_anchors(z, train_ids, slot, cfg.top)
    g, rng = torch.Generator().manual_seed(cfg.seed), np.random.default_rng(cfg.seed)
    Z = torch.from_numpy(batched(module.encode_latents, _rows(z, anchors, slot), 256, device))
    draws = batched(module.decode_latents, draw_latents(Z, cfg.subsample * cfg.n, cfg.mode, cfg.bandwidth, g).numpy(),
                    256, device)
    groups = {"sampled": (subsample(z.spec, draws, activation, data, cfg.n, cfg), np.full(cfg.n, -1))}
    if "scratch" in cfg.groups:
        groups["scratch"] = (None, np.full(cfg.n, -1))
    if "zoo_top" in cfg.groups:
        top = np.resize(anchors, cfg.n)
        groups["zoo_top"] = (_rows(z, top, slot), top)
    if "held_out" in cfg.groups:
        held = held[np.asarray(z.activations())[held] == activation][:cfg.n]
        if len(held):
            groups["held_out"] = (_rows(z, held, slot), held)
    for name, W in baseline_groups(z, train_ids, anchors, slot, cfg, rng).items():
        groups[name] = (W, np.full(len(W), -1))
    return groups, train_ids, anchors, z.hparams(int(anchors[0]))


def novelty(z: zoo.Zoo, groups: dict, train_ids, slot: int, data, activation: str) -> pd.DataFrame:
    """Per member of every group: test accuracy as given (fine-tuning epoch 0), and its nearest training
    member in weight space (raw, aligned) and function space (max wrong-prediction IoU, max agreement)."""
    W_train = _rows(z, train_ids, slot)
    acts = [z.activations()[i] for i in train_ids]
    ref = zoo.evaluate(z.spec, W_train, data, acts, predictions=True)
    wrong_train = ref["test_pred"] != data.y_test.cpu().numpy()[None]
    permuter = Permuter.of(z.spec)
    frames = []
    for name, (W, _) in tqdm(groups.items(), desc="memorization test", unit="group", leave=False):
        if W is None:  # fresh inits (scratch): nothing to compare
            continue
        ev = zoo.evaluate(z.spec, W, data, [activation] * len(W), predictions=True)
        wrong = ev["test_pred"] != data.y_test.cpu().numpy()[None]
        near = nearest(W, W_train, permuter)
        iou, agree = error_iou(wrong, wrong_train), agreement(ev["test_pred"], ref["test_pred"], z.num_classes)
        frames.append(pd.DataFrame({"group": name, "test_acc": ev["test_acc"], "nearest_l2": near.raw_l2,
                                    "nearest_l2_aligned": near.aligned_l2, "max_error_iou": iou.max(1),
                                    "max_agreement": agree.max(1), "nearest_member": train_ids[near.aligned_index]}))
    return pd.concat(frames, ignore_index=True)


def _finetune_data(z: zoo.Zoo, cfg: SampleConfig, device):
    if not cfg.dataset:
        return z.dataset(device=str(device)), {k: z.config.get(k) for k in DATA_KEYS}
    keys = {k: z.config.get(k) for k in DATA_KEYS} | {"dataset": cfg.dataset, "data_root": cfg.data_root}
    data = DataSpec.of(keys).load(device)
    if (data.input_shape, data.num_classes) != (z.input_shape, z.num_classes):
        raise UsageError(f"dataset '{cfg.dataset}' has inputs {data.input_shape} and {data.num_classes} classes; the "
                         f"zoo's members take {z.input_shape} and {z.num_classes} (set grayscale/resize to match)")
    return data, keys


def group_members(groups: dict, recipe: MemberSpec, cfg: SampleConfig) -> tuple[list[str], np.ndarray, list]:
    """(group name, source member, MemberSpec) of every member in writing order: the anchors' recipe, each
    member its own seed (fresh inits for the scratch group, dropout masks and data order for all)."""
    names = [name for name, (W, _) in groups.items() for _ in range(cfg.n if W is None else len(W))]
    sources = np.concatenate([src for _, src in groups.values()])
    members = [dataclasses.replace(recipe, seed=cfg.seed * 100_000 + i) for i in range(len(names))]
    return names, sources, members


def finetune(z: zoo.Zoo, groups: dict, members: list, cfg: SampleConfig, data, writer: ZooWriter,
             progress: bool) -> None:
    """All groups in one population, trained for the fine-tuning epochs from their given weights (scratch:
    fresh seeded inits), each epoch of `cfg.finetune` recorded. Non-finite given weights start diverged."""
    initial, at = [], 0
    for W, _ in groups.values():
        k = cfg.n if W is None else len(W)
        initial.append(init_flat(z.spec.create(members[at].activation), members[at:at + k]) if W is None
                       else torch.from_numpy(W))
        at += k
    W0 = torch.cat(initial)
    finite = torch.isfinite(W0).all(1)
    pop = Population(z.architecture, z.architecture_kwargs, members, data, precision=cfg.precision,
                     compile=cfg.compile, cuda_graphs=cfg.cuda_graphs, initial=torch.where(finite[:, None], W0, 0.0))
    pop.diverged |= ~finite.to(pop.device)
    bar = tqdm(total=len(members) * max(cfg.finetune), unit="model-epoch", desc="fine-tuning", disable=not progress)
    with bar:
        train_and_record(pop, np.arange(len(members)), cfg.finetune, writer, bar)


def sample_zoo(cfg: SampleConfig, progress: bool = True) -> Path:
    device = resolve_device(cfg.device)
    out = Path(cfg.out or f"data/samples/{Path(cfg.model).name}.h5")
    if out.suffix != ".h5":
        raise UsageError(f"output path {out} must end in .h5 (the sampled members are a zoo)")
    check_new_output(out, False, "sampled zoo")
    module, meta = load_run(cfg.model, str(device))
    with zoo.open(cfg.zoo) as z, output_lock(out):
        check_compatible(z, meta, cfg.model)
        split = run_split(z, meta)
        if split is None:
            raise UsageError(f"{cfg.model} was fitted on {meta['zoo']}: sampling needs the zoo the run was fitted on "
                             f"(its training members are the anchors); pass --zoo {meta['zoo']}")
        slot = resolve_slots([cfg.checkpoint], z, [])[0]
        source = z.dataset(device=str(device))
        groups, train_ids, anchors, recipe = build_groups(module, z, split, slot, cfg, device, source)
        report = novelty(z, groups, train_ids, slot, source, recipe.activation)
        data, data_keys = _finetune_data(z, cfg, device)
        names, sources, members = group_members(groups, recipe, cfg)
        writer = _writer(out, z, members, names, sources, cfg, data_keys, int(z.epochs[slot]))
        finetune(z, groups, members, cfg, data, writer, progress)
        writer.commit()
        _report(out, report, cfg, z, slot, anchors)
    return out


def _writer(out: Path, z: zoo.Zoo, members, names, sources, cfg: SampleConfig, data_keys, epoch: int) -> ZooWriter:
    config = yaml.safe_dump({**data_keys, "sample": to_dict(cfg)}, sort_keys=False)
    metrics = ["train_loss", "train_acc", "test_loss", "test_acc"] + \
        (["val_loss", "val_acc"] if data_keys.get("val_fraction") else [])
    attrs = {"source_zoo": str(z.path), "source_run": str(cfg.model),
             "source_model_sha256": file_sha256(Path(cfg.model) / "model.pt"), "source_checkpoint_epoch": epoch}
    return ZooWriter.create(out, z.spec, members, list(cfg.finetune), metrics, dataset=data_keys["dataset"],
                            config=config, attrs=attrs, fields={"group": names, "source_member": sources},
                            background=True)


def _report(out: Path, report: pd.DataFrame, cfg: SampleConfig, z: zoo.Zoo, slot: int, anchors) -> None:
    """novelty CSV + table, fine-tuning CSV + table, and the two plots, beside the sampled zoo."""
    stem = out.with_suffix("")
    with atomic_path(Path(f"{stem}.novelty.csv")) as tmp:
        report.to_csv(tmp, index=False)
    curves = finetune_curves(out)
    with atomic_path(Path(f"{stem}.finetune.csv")) as tmp:
        curves.to_csv(tmp, index=False)
    text = summary_table(report, curves, cfg, z, slot, len(anchors))
    with atomic_path(Path(f"{stem}.summary.md")) as tmp:
        tmp.write_text(text + "\n")
    plot_novelty(report, Path(f"{stem}.novelty.png"))
    plot_finetune(curves, Path(f"{stem}.finetune.png"))
    print(text)


def finetune_curves(path: Path) -> pd.DataFrame:
    """Test accuracy per group and fine-tuning epoch (mean, std, median) from the sampled zoo."""
    with zoo.open(path) as z:
        t = z.table.to_pandas()
    return t.groupby(["group", "epoch"], sort=False)["test_acc"].agg(["mean", "std", "median", "count"]).reset_index()


def summary_table(report: pd.DataFrame, curves: pd.DataFrame, cfg: SampleConfig, z: zoo.Zoo, slot: int,
                  n_anchors: int) -> str:
    head = (f"Sampling {cfg.n} members per group from {cfg.model} ({cfg.mode} KDE over {n_anchors} anchors = top "
            f"{cfg.top:g} of the training members at epoch {int(z.epochs[slot])}, subsample x{cfg.subsample}); "
            f"memorization test against the hyperrep's training members at that checkpoint.")
    lines = [head, "", "| group | test acc mean | median max wrong-IoU | median max agreement | median nearest L2 "
             "(raw) | median nearest L2 (aligned) |", "|---|---|---|---|---|---|"]
    for name, g in report.groupby("group", sort=False):
        lines.append(f"| {name} | {g['test_acc'].mean():.4f} | {g['max_error_iou'].median():.3f} | "
                     f"{g['max_agreement'].median():.3f} | {g['nearest_l2'].median():.3f} | "
                     f"{g['nearest_l2_aligned'].median():.3f} |")
    epochs = sorted(curves["epoch"].unique())
    lines += ["", "Fine-tuning (test accuracy, mean ± std):", "",
              "| group | " + " | ".join(f"epoch {e}" for e in epochs) + " |", "|---|" + "---|" * len(epochs)]
    for name, g in curves.groupby("group", sort=False):
        cells = [f"{r['mean']:.4f} ± {0 if np.isnan(r['std']) else r['std']:.4f}" for _, r in g.iterrows()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_novelty(report: pd.DataFrame, path: Path) -> None:
    """Accuracy vs novelty (max wrong-prediction IoU with any training member; lower is more novel)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, g in report.groupby("group", sort=False):
        ax.scatter(g["max_error_iou"], g["test_acc"], s=10, alpha=0.7, label=name)
    ax.set(xlabel="max wrong-prediction IoU with a training member", ylabel="test accuracy")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_finetune(curves: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, g in curves.groupby("group", sort=False):
        ax.errorbar(g["epoch"], g["mean"], yerr=g["std"].fillna(0), marker="o", ms=3, capsize=2, label=name)
    ax.set(xlabel="fine-tuning epochs", ylabel="test accuracy", xscale="symlog")
    ax.legend(fontsize=7)
    save_figure(fig, path)
