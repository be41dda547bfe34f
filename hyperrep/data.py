"""Weights from a zoo file, read lazily: member splits, normalisation statistics, and a DataModule."""
from __future__ import annotations

import h5py
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zoo import Permuter, UsageError, Zoo

from .embeddings import EXCLUDED, TEST, TRAIN, VAL


def split_members(usable: np.ndarray, fractions, seed: int) -> np.ndarray:
    """int8 split per member (0 train, 1 val, 2 test, -1 excluded): all checkpoints of a member share it."""
    ids = np.flatnonzero(usable)
    ids = ids[np.random.default_rng(seed).permutation(len(ids))]
    n_train, n_val = int(round(fractions[0] * len(ids))), int(round(fractions[1] * len(ids)))
    split = np.full(len(usable), EXCLUDED, np.int8)
    split[ids[:n_train]], split[ids[n_train:n_train + n_val]], split[ids[n_train + n_val:]] = TRAIN, VAL, TEST
    return split


def layer_stats(z: Zoo, members: np.ndarray, slots: list[int], chunk: int = 256,
                per_layer: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor mean and std over the given members and slots, expanded to (P,) vectors (one mean and std
    over every weight with `per_layer=False`)."""
    total = np.zeros(z.n_params)
    total_sq = np.zeros(z.n_params)
    n = 0
    for a in range(0, len(members), chunk):
        w = z.file["weights"][np.sort(members[a:a + chunk])][:, slots].astype(np.float64)  # (m, s, P)
        total += w.sum((0, 1))
        total_sq += (w ** 2).sum((0, 1))
        n += w.shape[0] * w.shape[1]
    mean, std = np.zeros(z.n_params), np.ones(z.n_params)
    if not per_layer:
        m = total.sum() / (n * z.n_params)
        v = total_sq.sum() / (n * z.n_params) - m * m
        mean[:], std[:] = m, np.sqrt(max(v, 0.0)) + 1e-8
        return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    for e in z.layout:
        m = total[e.slice].sum() / (n * e.size)
        v = total_sq[e.slice].sum() / (n * e.size) - m * m
        mean[e.slice], std[e.slice] = m, np.sqrt(max(v, 0.0)) + 1e-8
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


IN_MEMORY_BYTES = 4 << 30  # weight rows up to this size are read once into memory, larger ones per item from HDF5
N_PERMS = 512  # permutations drawn once per dataset; a view pair picks two of them (N_PERMS^2 combinations)


def read_rows(path: str, items: np.ndarray) -> torch.Tensor:
    """(n, P) float32 weights of (member, slot) items, read slot by slot in member order."""
    with h5py.File(path, "r") as f:
        w = f["weights"]
        rows = np.empty((len(items), w.shape[2]), np.float32)
        for s in np.unique(items[:, 1]):
            at = np.flatnonzero(items[:, 1] == s)
            order = np.argsort(items[at, 0], kind="stable")
            rows[at[order]] = w[items[at[order], 0], s]
    return torch.from_numpy(rows)


class WeightViews(Dataset):
    """(member, slot) items -> two views of the flat weight vector (weight-matched to `reference` if given,
    then independently permuted if `augment`) and the member's activation code (index into the run's
    activation names). Rows are read into memory once when they fit (IN_MEMORY_BYTES), aligned once, and
    permuted by gathers with a bank of N_PERMS seeded permutations; larger zoos are read per item."""

    def __init__(self, path: str, items: np.ndarray, permuter: Permuter | None, augment: bool,
                 reference: torch.Tensor | None, codes: np.ndarray | None = None, seed: int = 0,
                 in_memory: bool | None = None):
        if (augment or reference is not None) and permuter is None:
            raise ValueError("permutation augmentation and alignment need a Permuter")
        self.path, self.items, self.permuter, self.augment, self.reference = path, items, permuter, augment, reference
        self.codes = codes if codes is not None else np.zeros(int(items[:, 0].max(initial=0)) + 1, np.int64)
        self.file, self.rows, self.perms = None, None, None
        n_params = permuter.n_params if permuter is not None else None
        if in_memory is None:
            with h5py.File(path, "r") as f:
                n_params = f["weights"].shape[2]
            in_memory = len(items) * n_params * 4 <= IN_MEMORY_BYTES
        if in_memory:
            self.rows = read_rows(path, items)
            if reference is not None:
                self.rows = torch.stack([permuter.align(r, reference) for r in self.rows])
        if augment:
            g = torch.Generator().manual_seed(seed)
            self.perms = torch.stack([permuter.random_index(g) for _ in range(N_PERMS)]).int()

    def __len__(self):
        return len(self.items)

    def _row(self, i: int) -> torch.Tensor:
        if self.rows is not None:
            return self.rows[i]
        if self.file is None:  # opened per worker process
            self.file = h5py.File(self.path, "r")
        m, s = self.items[i]
        flat = torch.from_numpy(self.file["weights"][m, s])
        return self.permuter.align(flat, self.reference) if self.reference is not None else flat

    def __getitem__(self, i):
        flat, code = self._row(i), int(self.codes[self.items[i][0]])
        if not self.augment:
            return flat, flat, code
        a, b = torch.randint(0, N_PERMS, (2,)).tolist()
        return flat[self.perms[a]], flat[self.perms[b]], code


def activation_codes(activations: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per-member activation names -> (codes (n,) int64, the sorted names the codes index)."""
    names = sorted(set(map(str, activations)))
    return np.array([names.index(str(a)) for a in activations], np.int64), names


class ZooDataModule(L.LightningDataModule):
    def __init__(self, path: str, split: np.ndarray, slots: list[int], batch_size: int, num_workers: int,
                 permuter: Permuter | None, permute: bool, reference: torch.Tensor | None = None,
                 codes: np.ndarray | None = None):
        super().__init__()
        self.path, self.split, self.slots, self.codes = path, split, slots, codes
        self.batch_size, self.num_workers = batch_size, num_workers
        self.permuter, self.permute, self.reference = permuter, permute, reference

    def items(self, which: int) -> np.ndarray:
        members = np.flatnonzero(self.split == which)
        return np.array([(m, s) for m in members for s in self.slots], dtype=np.int64).reshape(-1, 2)

    def _loader(self, which: int, shuffle: bool) -> DataLoader:
        ds = WeightViews(self.path, self.items(which), self.permuter, self.permute and which == TRAIN, self.reference,
                         self.codes, seed=which)
        if len(ds) == 0:
            raise UsageError(f"the {['train', 'val', 'test'][which]} split is empty; use a larger zoo or other splits")
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          drop_last=shuffle and len(ds) > self.batch_size, persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        return self._loader(TRAIN, True)

    def val_dataloader(self):
        return self._loader(VAL, False)
