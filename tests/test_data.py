import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from zoo import UsageError, load_dataset


def _write_idx(path, arr, gz):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


@pytest.fixture
def fake_mnist(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "mnist"
    root.mkdir()
    for part, n, gz in [("train", 120, True), ("t10k", 30, False)]:
        _write_idx(root / f"{part}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(root / f"{part}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    return tmp_path


def test_idx_files_gz_and_raw(fake_mnist):
    d = load_dataset("mnist", fake_mnist)
    assert d.x_train.shape == (120, 1, 28, 28) and d.x_train.dtype == torch.uint8
    assert d.x_test.shape == (30, 1, 28, 28) and d.y_train[:12].tolist() == [*range(10), 0, 1]
    assert d.num_classes == 10


def test_resize_grayscale_and_validation_split(fake_mnist, tmp_path):
    d = load_dataset("mnist", fake_mnist, resize=14, val_fraction=0.25)
    assert d.x_train.shape == (90, 1, 14, 14) and d.x_val.shape == (30, 1, 14, 14)
    rgb = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "own.npz", x_train=rgb, y_train=np.arange(10) % 3, x_test=rgb[:4], y_test=np.arange(4) % 3)
    g = load_dataset(f"npz:{tmp_path / 'own.npz'}", grayscale=True)
    assert g.x_train.shape == (10, 1, 8, 8) and g.num_classes == 3
    assert int(g.x_train[0, 0, 0, 0]) == round(rgb[0, 0, 0].mean())


def test_normalization_uses_train_statistics():
    d = load_dataset("digits")
    x = d.normalize(d.x_train)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3


def test_cifar_binary_batches(tmp_path):
    root = tmp_path / "cifar10" / "cifar-10-batches-bin"
    root.mkdir(parents=True)
    for name, n in [*[(f"data_batch_{i}", 4) for i in range(1, 6)], ("test_batch", 3)]:
        rec = np.zeros((n, 3073), np.uint8)
        rec[:, 0] = np.arange(n)
        rec[:, 1:] = 7
        rec.tofile(root / f"{name}.bin")
    d = load_dataset("cifar10", tmp_path, grayscale=True)
    assert d.x_train.shape == (20, 1, 32, 32) and int(d.x_train.max()) == 7 and d.y_test.tolist() == [0, 1, 2]


def test_missing_files_and_unknown_names_are_clear(tmp_path):
    with pytest.raises(UsageError, match=r"train-images-idx3-ubyte\[.gz\] not found"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(UsageError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(UsageError, match="file not found"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")


def test_svhn_mat_files(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "svhn"
    root.mkdir()
    for part, n in [("train", 12), ("test", 4)]:
        x = np.random.default_rng(0).integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # SVHN's HWCN layout
        savemat(root / f"{part}_32x32.mat", {"X": x, "y": (np.arange(n) % 10 + 1)[:, None]})  # labels 1..10
    d = load_dataset("svhn", tmp_path)
    assert d.x_train.shape == (12, 3, 32, 32)
    assert d.y_train.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]  # SVHN's label 10 is the digit 0
    assert d.num_classes == 10 and d.y_test.tolist() == [1, 2, 3, 4]


def _cifar_batch(n: int, label0: int, protocol: int) -> bytes:
    data = np.arange(n * 3072, dtype=np.int64).reshape(n, 3072) % 251
    return pickle.dumps({b"batch_label": b"x", b"labels": [(label0 + i) % 10 for i in range(n)],
                         b"data": data.astype(np.uint8), b"filenames": [b"f"] * n}, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_python_batches_load_through_the_restricted_unpickler(tmp_path, protocol):
    root = tmp_path / "cifar10" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(_cifar_batch(3, i, protocol))
    (root / "test_batch").write_bytes(_cifar_batch(2, 7, protocol))
    d = load_dataset("cifar10", tmp_path)
    assert d.x_train.shape == (15, 3, 32, 32) and d.y_train[:3].tolist() == [1, 2, 3] and d.y_test.tolist() == [7, 8]
    assert int(d.x_train[0, 0, 0, 5]) == 5 and int(d.x_train[0, 1, 0, 0]) == 1024 % 251  # CHW rows of 1,024


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_cifar_pickle_that_calls_code_is_refused_and_does_not_run(tmp_path, monkeypatch):
    root = tmp_path / "cifar10" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": _Payload(), b"labels": [0]}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"refers to posix.system: not a standard CIFAR-10 file"):
        load_dataset("cifar10", tmp_path)
    assert not (tmp_path / "PWNED").exists()
