"""Probes on frozen weight features: splits, fits, scores, tables and plots (CLI: probes.evaluate)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.linalg import LinAlgWarning
from scipy.stats import kendalltau
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, GroupKFold, StratifiedGroupKFold
from sklearn.preprocessing import QuantileTransformer, StandardScaler
from tqdm import tqdm

from hyperrep.embeddings import TEST
from zoo import UsageError
from zoo.io import save_figure

from ._logistic import C_GRID, TorchLogistic, grouped_cv_logistic
from .features import ProbeData, target_kind, target_values

COLUMNS = ("W linear", "s(W) linear", "s(W) gbm", "emb linear", "emb seq linear")  # emb seq: every token's latent
PRIMARY = {"continuous": "r2", "categorical": "accuracy", "multilabel": "mean_balanced_accuracy"}
METRIC_LABEL = {"continuous": "R²", "categorical": "acc", "multilabel": "mean bal acc"}


def member_split(data: ProbeData, seed: int, test_fraction: float) -> np.ndarray:
    """Bool per row: in the test split. Whole members only: a given split file's test members, else the
    hyperrep fit's test members when known, else a seeded split of model ids, the same in every zoo (twin zoos,
    whose member i shares its draws and init across datasets, keep the twins on one side)."""
    if data.fixed_test is not None:
        return data.fixed_test
    if data.emb_split is not None and (data.emb_split == TEST).any() and (data.emb_split != TEST).any():
        return data.emb_split == TEST
    ids = data.rows["model_id"].to_numpy()
    uniq = np.unique(ids)
    test = np.random.default_rng(seed).permutation(uniq)[: max(1, int(round(test_fraction * len(uniq))))]
    return np.isin(ids, test)


def probe_device(device: str = "auto") -> str:
    """Where the probes' dense linear algebra runs: 'cuda' (torch, float64) when asked or available, else 'cpu'."""
    if device == "auto":
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _eigh_gram(X: np.ndarray, device: str = "cpu", rows: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (clipped at 0) and eigenvectors of X^T X (p x p), or of X X^T (n x n) with rows, in float64.
    On 'cuda' through torch: one 5,000-wide decomposition costs ~10 s on 16 CPU cores, and a fold's probes on a
    10,000-member zoo need a dozen. 'torch' runs the torch path on the CPU (tests compare it with numpy's)."""
    if device == "cpu":
        s2, v = np.linalg.eigh(X @ X.T if rows else X.T @ X)
        return np.clip(s2, 0.0, None), v
    import torch
    xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64)).to("cpu" if device == "torch" else device)
    s2, v = torch.linalg.eigh(xt @ xt.T if rows else xt.T @ xt)
    return s2.clamp_min(0.0).cpu().numpy(), v.cpu().numpy()


class _RidgeFolds:
    """Grouped K-fold decompositions of one input matrix for ridge: the eigendecomposition of each training
    fold's centred Gram matrix (p x p), from which every alpha's solution is one product. Every continuous
    target on these inputs reuses them (the folds depend on the member groups only): a 10,000-member zoo's
    raw weights (40k rows x 4,970) then cost six decompositions per feature set, not six per target."""

    def __init__(self, X, groups, n_splits: int, device: str = "cpu"):
        self.X, self.device = X, device
        self.splits = list(GroupKFold(n_splits=n_splits).split(X, groups=groups))
        self._dec: dict[int, tuple] = {}

    def decomposition(self, fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(rows, mean, eigenvalues, eigenvectors) of a training fold (-1: all rows)."""
        if fold not in self._dec:
            rows = np.arange(len(self.X)) if fold < 0 else self.splits[fold][0]
            xc = self.X[rows]  # one copy, centred in place
            mx = xc.mean(0)
            xc -= mx
            s2, v = _eigh_gram(xc, self.device)
            self._dec[fold] = rows, mx, s2, v
        return self._dec[fold]

    def path(self, y, fold: int, alphas) -> tuple[np.ndarray, np.ndarray]:
        """Coefficients (p, n_alphas) and intercepts of ridge on the fold's centred rows, for every alpha."""
        rows, mx, s2, v = self.decomposition(fold)
        my = y[rows].mean()
        r = np.zeros(len(self.X))
        r[rows] = y[rows] - my  # Xc^T (y - my) = X^T r (Xc^T 1 = 0): no copy of the fold's rows per target
        proj = v.T @ (self.X.T @ r)  # (p,)
        coefs = v @ (proj[:, None] / (s2[:, None] + np.asarray(alphas)[None, :]))
        return coefs, my - mx @ coefs


class _RidgeCV:
    """Ridge with alpha chosen by grouped K-fold CV on shared fold decompositions (`_RidgeFolds`)."""
    alphas = np.logspace(-3, 5, 17)

    def fit(self, folds: _RidgeFolds, y):
        err = np.zeros(len(self.alphas))
        for i, (_, va) in enumerate(folds.splits):
            coefs, b = folds.path(y, i, self.alphas)
            err += ((folds.X[va] @ coefs + b - y[va][:, None]) ** 2).sum(0)
        self.alpha_ = self.alphas[int(np.argmin(err))]
        coefs, intercept = folds.path(y, -1, [self.alpha_])
        self.coef_, self.intercept_ = coefs[:, 0], intercept[0]
        return self

    def predict(self, X):
        return X @ self.coef_ + self.intercept_


def _n_splits(kind: str, groups) -> int:
    return min(5 if kind == "continuous" else 3, len(np.unique(groups)))


def _linear(kind: str, X, y, groups, seed: int, folds: _RidgeFolds | None = None, device: str = "cpu"):
    """Ridge (continuous) or logistic regression: sklearn's on 'cpu', the same objective in torch
    (`_logistic.py`) on 'cuda' / 'torch'."""
    n_splits = _n_splits(kind, groups)
    if kind == "continuous":
        return _RidgeCV().fit(folds or _RidgeFolds(X, groups, n_splits), y)
    # C by grouped CV, when every class spans enough members that each training fold holds them all
    members_per_class = min(len(np.unique(groups[y == c])) for c in np.unique(y))
    if device != "cpu":
        return (TorchLogistic(0.1, device).fit(X, y) if members_per_class < 2 * n_splits
                else grouped_cv_logistic(X, y, groups, n_splits, seed, device))
    if members_per_class < 2 * n_splits:
        return LogisticRegression(max_iter=300, tol=1e-3, C=0.1).fit(X, y)
    search = GridSearchCV(LogisticRegression(max_iter=300, tol=1e-3), {"C": list(C_GRID)},
                          cv=StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed))
    return search.fit(X, y, groups=groups).best_estimator_


def prepare(column: str, data: ProbeData, test: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(train, test) inputs of a probe. Linear probes see standardised features; s(W) is first
    rank-Gaussianised per feature (a quantile transform fitted on the training rows: its variances and
    extremes are heavy-tailed, and a member whose weights blew up must not dominate a linear fit).
    With more features than training rows, inputs are expressed in the row space of the training rows
    (X V from its SVD): exact for L2-penalised linear models, whose solutions lie in that space, and cheaper.
    `device` runs the decompositions (`probe_device`)."""
    features = {"W": data.W, "s(W)": data.sW, "emb": data.emb, "emb seq": data.emb_seq}
    X = features[column.rsplit(" ", 1)[0]].astype(np.float64)  # "s(W) gbm" -> s(W), "emb seq linear" -> emb seq
    if column.endswith("gbm"):
        return X[~test], X[test]
    if column.startswith("s(W)"):
        # every training row sets the quantiles (sklearn's default subsamples 10,000 rows unseeded: the
        # probe would differ run to run on large zoos)
        q = QuantileTransformer(n_quantiles=min(1000, int((~test).sum())), output_distribution="normal",
                                subsample=None)
        q.fit(X[~test])
        X = np.empty_like(X)
        X[~test], X[test] = q.transform(data.sW[~test]), q.transform(data.sW[test])
    scaler = StandardScaler().fit(X[~test])
    Xtr, Xte = scaler.transform(X[~test]), scaler.transform(X[test])
    if Xtr.shape[1] > Xtr.shape[0]:  # X V = U S with Xtr Xtr^T = U S^2 U^T: an n x n eigh, not an n x p SVD
        s2, u = _eigh_gram(Xtr, device, rows=True)
        keep = s2 > 1e-12 * s2.max()  # below: rounding noise of the Gram matrix, directions ridge cannot use
        u, s = u[:, keep], np.sqrt(s2[keep])
        Xtr, Xte = u * s, (Xte @ Xtr.T) @ (u / s)  # (n_train, k), (n_test, k)
    return Xtr, Xte


def fit_predict(column: str, kind: str, data: ProbeData, y, test, seed: int, inputs=None,
                folds: _RidgeFolds | None = None, device: str = "cpu") -> np.ndarray:
    """Fit one probe on the training rows, predict the test rows. Regression predictions are clipped
    to the range of the training targets (a linear map must not extrapolate an accuracy above 1).
    `inputs` (train, test) and ridge `folds` on those training inputs may come from earlier targets; `device`
    is where logistic probes fit (`_linear`)."""
    Xtr, Xte = inputs if inputs is not None else prepare(column, data, test)
    if kind == "multilabel":  # one binary probe per label column; a label constant in training is predicted so
        return np.stack([_binary(column, data, y[:, k], test, seed, (Xtr, Xte), device) for k in range(y.shape[1])],
                        1)
    if column.endswith("gbm"):
        cls = HistGradientBoostingRegressor if kind == "continuous" else HistGradientBoostingClassifier
        return cls(max_iter=200, random_state=seed).fit(Xtr, y[~test]).predict(Xte)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a probe that did not converge is still a probe
        warnings.simplefilter("ignore", LinAlgWarning)  # ill-conditioned at the smallest alphas; CV avoids them
        model = _linear(kind, Xtr, y[~test], data.rows["member"].to_numpy()[~test], seed, folds, device)
    pred = model.predict(Xte)
    return np.clip(pred, y[~test].min(), y[~test].max()) if kind == "continuous" else pred


def _binary(column: str, data: ProbeData, y, test, seed: int, inputs, device: str = "cpu") -> np.ndarray:
    if len(np.unique(y[~test])) < 2:
        return np.full(int(test.sum()), y[~test][0])
    return fit_predict(column, "categorical", data, y, test, seed, inputs, device=device).astype(y.dtype)


def _metrics(kind: str, y, pred) -> dict[str, float]:
    if kind == "multilabel":  # mean over labels (that vary in the test rows) of the balanced accuracy
        accs = [np.mean([(pred[y[:, k] == c, k] == c).mean() for c in (0, 1)])
                for k in range(y.shape[1]) if len(np.unique(y[:, k])) == 2]
        return {"mean_balanced_accuracy": float(np.mean(accs)) if accs else np.nan,
                "exact_match": float((pred == y).all(1).mean())}
    if kind == "continuous":
        sst = ((y - y.mean()) ** 2).sum()
        r2 = 1 - ((y - pred) ** 2).sum() / sst if sst > 0 else np.nan
        tau = kendalltau(y, pred).statistic if np.ptp(pred) > 0 and np.ptp(y) > 0 else 0.0
        return {"r2": float(r2), "kendall_tau": float(tau)}
    hit = y == pred
    recalls = [hit[y == c].mean() for c in np.unique(y)]
    return {"accuracy": float(hit.mean()), "balanced_accuracy": float(np.mean(recalls))}


def score(kind: str, y, pred, members, n_boot: int, seed: int) -> dict[str, float]:
    """Metrics with 95 % intervals from a bootstrap over test members (all of a member's rows together)."""
    out = _metrics(kind, y, pred)
    uniq, inverse = np.unique(members, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == i) for i in range(len(uniq))]
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resample with a single class or constant target gives NaN
        boots = [_metrics(kind, y[idx], pred[idx]) for idx in
                 (np.concatenate([rows_of[i] for i in rng.integers(0, len(uniq), len(uniq))]) for _ in range(n_boot))]
    for k in list(out):
        vals = np.array([b[k] for b in boots], float)
        ok = np.isfinite(vals)  # no resample defined (e.g. a constant test target): no interval
        out[f"{k}_lo"], out[f"{k}_hi"] = np.percentile(vals[ok], [2.5, 97.5]) if ok.any() else (np.nan, np.nan)
    return out


def evaluate_probes(data: ProbeData, targets: list[str], seed: int = 0, test_fraction: float = 0.2, n_boot: int = 200,
                    progress: bool = False, device: str = "auto", columns: list[str] | None = None,
                    regress: tuple[str, ...] = ()):
    """-> (long results table, predictions {target: {column: (y_test, pred)}}, test mask). `device`: where the
    linear probes' decompositions and logistic fits run (auto: CUDA when available; trees and scores stay on
    the CPU).
    `columns`: a subset of COLUMNS (default: every column the inputs allow); `regress`: targets probed as
    continuous even with few values (`target_kind`)."""
    device = probe_device(device)
    test = member_split(data, seed, test_fraction)
    members = data.rows["member"].to_numpy()
    if not test.any() or test.all():
        raise UsageError(f"the member split leaves {'no' if not test.any() else 'only'} test rows; "
                         f"change test_fraction or the split file")
    assert not set(members[test]) & set(members[~test])  # no member on both sides
    columns = [c for c in COLUMNS if (data.emb is not None or not c.startswith("emb"))
               and (data.emb_seq is not None or not c.startswith("emb seq")) and (not columns or c in columns)]
    if not columns:
        raise UsageError("none of the asked probe columns has inputs (emb columns need embeddings, emb seq "
                         "embeddings written with sequence=true)")
    jobs = [(t, target_kind(data.rows[t], t, tuple(regress))) for t in targets]
    jobs = [(t, k) for t, k in jobs if k is not None]
    results, predictions, inputs, folds = [], {}, {}, {}
    bar = tqdm(total=len(jobs) * len(columns), unit="probe", desc="probes", disable=not progress)
    with bar:
        for name, kind in jobs:
            y = target_values(data.rows, name, kind)
            predictions[name] = {}
            for col in columns:
                bar.set_postfix_str(f"{name} / {col}", refresh=False)
                if col not in inputs:
                    inputs[col] = prepare(col, data, test, device)
                if kind == "continuous" and col not in folds and not col.endswith("gbm"):
                    folds[col] = _RidgeFolds(inputs[col][0], members[~test], _n_splits(kind, members[~test]), device)
                pred = fit_predict(col, kind, data, y, test, seed, inputs[col], folds.get(col), device)
                predictions[name][col] = (y[test], pred)
                results.append({"target": name, "kind": kind, "column": col,
                                **score(kind, y[test], pred, members[test], n_boot, seed)})
                bar.update()
    return pd.DataFrame(results), predictions, test


def markdown_table(results: pd.DataFrame) -> str:
    """One row per target (its primary metric, 95 % interval); test accuracy also by Kendall's tau, the
    literature's measure of ranking members by predicted accuracy."""
    cols = [c for c in COLUMNS if c in set(results["column"])]
    lines = ["| target | metric | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for target, g in results.groupby("target", sort=False):
        kind = g["kind"].iloc[0]
        metrics = [(PRIMARY[kind], METRIC_LABEL[kind])]
        if target == "test_acc" and kind == "continuous":
            metrics.append(("kendall_tau", "Kendall τ"))
        for m, label in metrics:
            cells = [f"{r[m]:.3f} [{r[m + '_lo']:.3f}, {r[m + '_hi']:.3f}]"
                     for r in (g[g["column"] == c].iloc[0] for c in cols)]
            lines.append(f"| {target} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_predictions(predictions: dict, results: pd.DataFrame, out: Path) -> list[Path]:
    """One PNG per target: predicted vs true (continuous) or a confusion matrix (categorical), per probe."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for target, cols in predictions.items():
        kind = results[results["target"] == target]["kind"].iloc[0]
        fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.2), squeeze=False)
        for ax, (col, (y, pred)) in zip(axes[0], cols.items()):
            m = results[(results["target"] == target) & (results["column"] == col)].iloc[0]
            if kind == "continuous":
                ax.scatter(y, pred, s=6, alpha=0.5)
                lims = [min(y.min(), pred.min()), max(y.max(), pred.max())]
                ax.plot(lims, lims, "k--", lw=0.8)
                ax.set(xlabel=f"true {target}", ylabel="predicted", title=f"{col}\nR² {m['r2']:.3f}")
            elif kind == "multilabel":  # balanced accuracy of each label's probe
                accs = [np.mean([(pred[y[:, k] == c, k] == c).mean() for c in (0, 1)])
                        if len(np.unique(y[:, k])) == 2 else np.nan for k in range(y.shape[1])]
                ax.bar(range(len(accs)), accs)
                ax.axhline(0.5, color="k", ls="--", lw=0.8)
                ax.set(xlabel="class", ylabel="balanced accuracy", ylim=(0, 1),
                       title=f"{col}\nmean {m['mean_balanced_accuracy']:.3f}")
            else:
                labels = sorted(set(y))
                cm = pd.crosstab(pd.Categorical(y, labels), pd.Categorical(pred, labels), dropna=False).to_numpy()
                ax.imshow(cm, cmap="Blues")
                ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
                ax.set_yticks(range(len(labels)), labels, fontsize=7)
                ax.set(xlabel="predicted", ylabel="true", title=f"{col}\nacc {m['accuracy']:.3f}")
        fig.tight_layout()
        path = out / "plots" / f"{target}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_embedding_space(data: ProbeData, path: Path, traits: tuple[str, ...] = ("label_noise", "train_fraction",
                                                                                    "test_acc")) -> Path | None:
    """The embeddings' first two principal components, one panel per colouring: the dataset (several zoos) and
    each trait that varies. None without embeddings."""
    if data.emb is None:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    rows = data.rows
    xy = PCA(n_components=2, random_state=0).fit_transform(data.emb)  # (n_rows, 2)
    panels = [("dataset", False)] if "dataset" in rows and rows["dataset"].nunique() > 1 else []
    panels += [(t, True) for t in traits if t in rows and rows[t].nunique() > 1]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, (name, continuous) in zip(axes[0], panels):
        if continuous:
            fig.colorbar(ax.scatter(*xy.T, c=rows[name], s=3, cmap="viridis"), ax=ax)
        else:
            for value in sorted(rows[name].astype(str).unique()):
                ax.scatter(*xy[rows[name].astype(str).to_numpy() == value].T, s=3, label=value)
            ax.legend(fontsize=7, markerscale=3)
        ax.set(title=name, xticks=[], yticks=[])
    fig.suptitle(f"embeddings, PCA ({len(rows)} rows)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path, dpi=110)


def _default_embeddings(zoos: list[str]) -> list[str] | None:
    paths = [str(Path(z).with_suffix(".embeddings.h5")) for z in zoos]
    return paths if all(Path(p).is_file() for p in paths) else None
