"""Datasets as uint8 image tensors on the training device; batches are gathered by index.

Names: `digits` (scikit-learn's bundled 8x8 digits, offline), `mnist`, `fashion_mnist` (IDX files),
`cifar10` (`cifar-10-batches-py` or `-bin`), `svhn` (`*_32x32.mat`), `npz:PATH` (bring your own:
`x_train, y_train, x_test, y_test`, uint8 images NHW or NHWC, integer labels).
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cli import UsageError

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "svhn", "npz:PATH", "sequence")
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass
class Split:
    x: np.ndarray  # (N, C, H, W) uint8
    y: np.ndarray  # (N,) int64


@dataclass
class ImageData:
    """Train / val / test images as uint8 (N, C, H, W) on one device, with the train-set normalisation."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor | None
    y_val: torch.Tensor | None
    mean: torch.Tensor  # (C,) of x / 255 over the training split
    std: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "ImageData":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return ImageData(**moved)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) -> float32, standardised per channel."""
        shape = (-1, 1, 1)
        return (x.float() / 255.0 - self.mean.view(shape)) / self.std.view(shape)

    label_dims = 0  # dims of one sample's target (sequence data: 1, a target per position)

    def groups(self, split: str) -> torch.Tensor:
        """(N,) the group of each sample of `split` that a member's class_subset selects: its class."""
        return {"train": self.y_train, "test": self.y_test, "val": self.y_val}[split]

    @property
    def num_groups(self) -> int:
        return self.num_classes


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UsageError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _find(root: Path, stem: str, dataset: str) -> Path:
    for cand in (root / stem, root / (stem + ".gz"), root / "raw" / stem, root / "raw" / (stem + ".gz")):
        if cand.is_file():
            return cand
    raise UsageError(f"dataset '{dataset}': {root / stem}[.gz] not found; put the IDX files in {root} "
                     f"or set download=true (needs torchvision) or data_root=DIR")


def _load_idx(root: Path, dataset: str) -> tuple[Split, Split]:
    splits = []
    for part in ("train", "test"):
        img, lab = (_read_idx(_find(root, s, dataset)) for s in _IDX_FILES[part])
        splits.append(Split(img[:, None], lab.astype(np.int64)))
    return splits[0], splits[1]


class _ArrayUnpickler(pickle.Unpickler):
    """Reads CIFAR's python batches: dicts of numpy arrays, lists and bytes; no other callable is allowed.
    The official files are Python 2 pickles; re-pickled ones (protocol 2 under Python 3 encodes bytes with
    `_codecs.encode`, protocol 5 rebuilds arrays with `_frombuffer`) load too."""
    _ALLOWED = {(f"numpy{core}.{mod}", name) for core in (".core", "._core") for mod, name in
                (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))} \
        | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise UsageError(f"CIFAR batch refers to {module}.{name}: not a standard CIFAR-10 file")
        return super().find_class(module, name)


def _load_cifar10(root: Path) -> tuple[Split, Split]:
    py, binary = root / "cifar-10-batches-py", root / "cifar-10-batches-bin"
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    out = []
    for part in ("train", "test"):
        xs, ys = [], []
        for n in names[part]:
            if (py / n).is_file():
                d = _ArrayUnpickler(io.BytesIO((py / n).read_bytes()), encoding="bytes").load()
                xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d[b"labels"], np.int64))
            elif (binary / (n + ".bin")).is_file():
                rec = np.fromfile(binary / (n + ".bin"), np.uint8).reshape(-1, 3073)
                xs.append(rec[:, 1:].reshape(-1, 3, 32, 32))
                ys.append(rec[:, 0].astype(np.int64))
            else:
                raise UsageError(f"dataset 'cifar10': {py / n} not found; put cifar-10-batches-py in {root} "
                                 f"or set download=true (needs torchvision)")
        out.append(Split(np.concatenate(xs), np.concatenate(ys)))
    return out[0], out[1]


def _load_svhn(root: Path) -> tuple[Split, Split]:
    from scipy.io import loadmat

    out = []
    for part in ("train", "test"):
        path = root / f"{part}_32x32.mat"
        if not path.is_file():
            raise UsageError(f"dataset 'svhn': {path} not found; set data_root=DIR or download=true")
        mat = loadmat(path)
        y = mat["y"].reshape(-1).astype(np.int64)
        out.append(Split(np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1)), np.where(y == 10, 0, y)))
    return out[0], out[1]


def _load_digits() -> tuple[Split, Split]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(d.images * 16, 0, 255).astype(np.uint8)[:, None]  # values 0..16 -> 0..255
    order = np.random.default_rng(0).permutation(len(x))  # fixed 80/20 split
    n_test = len(x) // 5
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], d.target[train].astype(np.int64)), Split(x[test], d.target[test].astype(np.int64))


MAX_CLASSES = 1024  # labels are class ids 0..K-1; a stray huge label would size every member's classifier by it


def check_labels(y: np.ndarray, n_images: int, where: str) -> np.ndarray:
    """Labels as int64 class ids: 1-D, one per image, integral, in [0, MAX_CLASSES)."""
    if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
        raise UsageError(f"{where} must be integer class ids, got dtype {y.dtype}" +
                         (" with fractional or non-finite values" if y.dtype.kind == "f" else ""))
    if y.ndim != 1 or len(y) != n_images:
        raise UsageError(f"{where} must be one label per image: shape ({n_images},), got {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= MAX_CLASSES):
        raise UsageError(f"{where} must lie in [0, {MAX_CLASSES}) (class ids 0..K-1), got {y.min()}..{y.max()}")
    return y.astype(np.int64)


def _load_npz(path: Path) -> tuple[Split, Split]:
    if not path.is_file():
        raise UsageError(f"dataset npz:{path}: file not found")
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an archive of arrays")
        arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in f.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # not an npz, truncated, or object arrays
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"dataset npz:{path} is not a readable .npz of plain arrays ({detail})") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise UsageError(f"dataset npz:{path} lacks array '{missing[0]}' (needs x_train, y_train, x_test, y_test)")
    out = []
    for part in ("train", "test"):
        x = arrays[f"x_{part}"]
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or len(x) == 0 or min(x.shape[1:]) < 1:
            raise UsageError(f"dataset npz:{path}: x_{part} must be non-empty uint8 NHW or NHWC images, "
                             f"got {x.dtype} {x.shape}")
        y = check_labels(arrays[f"y_{part}"], len(x), f"dataset npz:{path}: y_{part}")
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        out.append(Split(np.ascontiguousarray(x), y))
    return out[0], out[1]


def _download(name: str, root: Path) -> None:
    try:
        import torchvision.datasets as tvd
    except Exception:  # torchvision missing or unimportable with this torch
        raise UsageError(f"download=true for '{name}' needs torchvision (pip install torchvision); "
                         f"or place the files in {root} yourself") from None
    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}.get(name)
    if name == "svhn":
        for split in ("train", "test"):
            tvd.SVHN(str(root), split=split, download=True)
    elif cls is not None:
        for train in (True, False):
            cls(str(root if name == "cifar10" else root.parent), train=train, download=True)
        if name != "cifar10":  # torchvision keeps IDX files in <root>/<ClassName>/raw
            src = root.parent / cls.__name__ / "raw"
            root.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                (root / f.name).write_bytes(f.read_bytes())


def load_splits(name: str, data_root: str | Path = "data/datasets", download: bool = False) -> tuple[Split, Split]:
    """Raw train and test splits as uint8 NCHW arrays."""
    if name == "digits":
        return _load_digits()
    if name.startswith("npz:"):
        return _load_npz(Path(name[4:]))
    loaders = {"mnist": _load_idx, "fashion_mnist": _load_idx, "cifar10": lambda r, n: _load_cifar10(r),
               "svhn": lambda r, n: _load_svhn(r)}
    if name not in loaders:
        raise UsageError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    root = Path(data_root) / name
    if download:
        _download(name, root)
    return loaders[name](root, name)


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(x).float()
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])
    return t.round().clamp(0, 255).to(torch.uint8).numpy()


@dataclass(frozen=True)
class DataSpec:
    """Which dataset a zoo trains on and how it is preprocessed (the data keys of a zoo config)."""
    name: str = "digits"
    root: str = "data/datasets"
    download: bool = False
    grayscale: bool = False
    resize: int | None = None
    val_fraction: float = 0.0
    scaling: str = "standardize"  # see SCALINGS
    mean: tuple[float, ...] = ()  # per channel, with scaling "fixed"
    std: tuple[float, ...] = ()
    sequence: tuple[tuple[str, object], ...] = ()  # dataset "sequence": the SequenceSpec keys (zoo.sequences)

    @classmethod
    def of(cls, cfg) -> "DataSpec":
        """From a zoo config (a `ZooConfig` or the mapping stored in a zoo file)."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        return cls(get("dataset", "digits"), get("data_root", "data/datasets"), bool(get("download", False)),
                   bool(get("grayscale", False)), get("resize"), float(get("val_fraction", 0.0)),
                   get("input_scaling", "standardize") or "standardize", tuple(get("input_mean", ()) or ()),
                   tuple(get("input_std", ()) or ()), tuple(sorted((get("sequence", {}) or {}).items())))

    def load(self, device: str | torch.device = "cpu") -> ImageData:
        if self.name == "sequence":
            from .sequences import SequenceSpec, make_sequences
            return make_sequences(SequenceSpec.of(dict(self.sequence))).to(device)
        if self.sequence:
            raise UsageError(f"sequence: keys are for dataset: sequence, not '{self.name}'")
        data = load_dataset(self.name, self.root, self.download, self.grayscale, self.resize, self.val_fraction,
                            device)
        return rescale(data, self.scaling, self.mean, self.std)


# How images become network inputs, (x / 255 - mean) / std per channel: "standardize" with the training split's
# statistics (weightzoo's builds), "minus_one_one" (x / 127.5 - 1, the Small CNN Zoo), "unit" (x / 255), "fixed"
# (given mean and std, e.g. torchvision's Normalize((0.1307,), (0.3081,)) of the Model Zoos).
SCALINGS = ("standardize", "minus_one_one", "unit", "fixed")


def rescale(data: ImageData, scaling: str, mean=(), std=()) -> ImageData:
    if scaling not in SCALINGS:
        raise UsageError(f"input_scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
    C = data.input_shape[0]
    if scaling == "standardize":
        return data
    if scaling == "fixed":
        if len(mean) != C or len(std) != C or min(std) <= 0:
            raise UsageError(f"input_scaling=fixed needs input_mean and input_std with {C} value(s) each (std > 0), "
                             f"got {list(mean)} and {list(std)}")
        m, s = torch.tensor(mean), torch.tensor(std)
    else:
        m, s = torch.full((C,), 0.5 if scaling == "minus_one_one" else 0.0), \
            torch.full((C,), 0.5 if scaling == "minus_one_one" else 1.0)
    return dataclasses.replace(data, mean=m.float().to(data.mean.device), std=s.float().to(data.std.device))


def load_dataset(name: str, data_root: str | Path = "data/datasets", download: bool = False, grayscale: bool = False,
                 resize: int | None = None, val_fraction: float = 0.0, device: str | torch.device = "cpu") -> ImageData:
    """Load, preprocess (grayscale, resize, validation split) and move to `device` as uint8."""
    train, test = load_splits(name, data_root, download)
    for s in (train, test):
        if grayscale:
            s.x = s.x.mean(axis=1, keepdims=True).round().astype(np.uint8)
        if resize:
            s.x = _resize(s.x, resize)
    x_val = y_val = None
    if val_fraction > 0:  # a fixed held-out slice of the training set
        order = np.random.default_rng(1).permutation(len(train.x))
        n_val = int(round(val_fraction * len(train.x)))
        x_val, y_val = torch.from_numpy(train.x[order[:n_val]]), torch.from_numpy(train.y[order[:n_val]])
        train = Split(train.x[np.sort(order[n_val:])], train.y[np.sort(order[n_val:])])
    xf = train.x.astype(np.float64) / 255.0
    mean, std = xf.mean(axis=(0, 2, 3)), xf.std(axis=(0, 2, 3)) + 1e-8
    num_classes = int(max(train.y.max(), test.y.max())) + 1
    data = ImageData(name, torch.from_numpy(train.x), torch.from_numpy(train.y), torch.from_numpy(test.x),
                     torch.from_numpy(test.y), x_val, y_val, torch.tensor(mean, dtype=torch.float32),
                     torch.tensor(std, dtype=torch.float32), num_classes)
    return data.to(device)
