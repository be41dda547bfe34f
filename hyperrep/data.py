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


def layer_stats(zoos: Zoo | list[Zoo], members, slots: list[int], chunk: int = 256,
                per_layer: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor mean and std over the given members and slots (of one zoo, or of several zoos of one layout:
    `members` then one id array per zoo), expanded to (P,) vectors; one mean and std over every weight with
    `per_layer=False`."""
    zoos, members = ([zoos], [members]) if isinstance(zoos, Zoo) else (list(zoos), list(members))
    layout = zoos[0].layout
    total, total_sq, n = np.zeros(layout.n_params), np.zeros(layout.n_params), 0
    for z, ids in zip(zoos, members):
        for a in range(0, len(ids), chunk):
            m = np.sort(ids[a:a + chunk])
            w = z.weight_items(np.repeat(m, len(slots)), np.tile(slots, len(m))).astype(np.float64)  # (m * s, P)
            total += w.sum(0)
            total_sq += (w ** 2).sum(0)
            n += w.shape[0]
    mean, std = np.zeros(layout.n_params), np.ones(layout.n_params)
    groups = [slice(0, layout.n_params)] if not per_layer else [e.slice for e in layout]
    for sl in groups:
        size = sl.stop - sl.start
        m = total[sl].sum() / (n * size)
        v = total_sq[sl].sum() / (n * size) - m * m
        mean[sl], std[sl] = m, np.sqrt(max(v, 0.0)) + 1e-8
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


IN_MEMORY_BYTES = 4 << 30  # weight rows up to this size are read once into memory, larger ones per item from HDF5
N_PERMS = 512  # permutations drawn once per dataset; a view pair picks two of them (N_PERMS^2 combinations)


def read_rows(path: str, items: np.ndarray) -> torch.Tensor:
    """(n, P) float32 weights of (member, slot) items (`Zoo.weight_items`)."""
    with Zoo(path) as z:
        return torch.from_numpy(z.weight_items(items[:, 0], items[:, 1]))


class WeightViews(Dataset):
    """(zoo, member, slot) items -> two views of the flat weight vector (weight-matched to `reference` if
    given, then independently permuted if `augment`) and the member's activation code (index into the run's
    activation names). `paths` is one zoo file or a list (items then carry the zoo index first). Rows are read
    into memory once when they fit (IN_MEMORY_BYTES), aligned once, and permuted by gathers with a bank of
    N_PERMS seeded permutations; larger zoos are read per item."""

    def __init__(self, paths, items: np.ndarray, permuter: Permuter | None, augment: bool,
                 reference: torch.Tensor | None, codes=None, seed: int = 0, in_memory: bool | None = None):
        if (augment or reference is not None) and permuter is None:
            raise ValueError("permutation augmentation and alignment need a Permuter")
        self.paths = [paths] if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__") else list(paths)
        items = np.asarray(items, np.int64).reshape(-1, items.shape[-1] if len(items) else 3)
        self.items = np.column_stack([np.zeros(len(items), np.int64), items]) if items.shape[1] == 2 else items
        self.permuter, self.augment, self.reference = permuter, augment, reference
        self.codes = codes if isinstance(codes, list) else [codes] * len(self.paths)
        self.files, self.rows, self.perms = {}, None, None
        if in_memory is None:
            with h5py.File(self.paths[0], "r") as f:
                n_params = f["weights"].shape[2]
            in_memory = len(self.items) * n_params * 4 <= IN_MEMORY_BYTES
        if in_memory:
            self.rows = self._read_all()
        if augment:
            g = torch.Generator().manual_seed(seed)
            self.perms = torch.stack([permuter.random_index(g) for _ in range(N_PERMS)]).int()

    def _read_all(self) -> torch.Tensor:
        rows = None
        for k, path in enumerate(self.paths):
            at = np.flatnonzero(self.items[:, 0] == k)
            if not len(at):
                continue
            part = read_rows(str(path), self.items[at, 1:])
            rows = torch.empty(len(self.items), part.shape[1]) if rows is None else rows
            rows[torch.from_numpy(at)] = part
        if rows is not None and self.reference is not None:
            rows = torch.stack([self.permuter.align(r, self.reference) for r in rows])
        return rows

    def __len__(self):
        return len(self.items)

    def _row(self, i: int) -> torch.Tensor:
        if self.rows is not None:
            return self.rows[i]
        k, m, s = self.items[i]
        if k not in self.files:  # opened per worker process
            self.files[k] = h5py.File(self.paths[k], "r")
        flat = torch.from_numpy(self.files[k]["weights"][m, s])
        return self.permuter.align(flat, self.reference) if self.reference is not None else flat

    def _code(self, i: int) -> int:
        k, m, _ = self.items[i]
        return 0 if self.codes[k] is None else int(self.codes[k][m])

    def __getitem__(self, i):
        flat, code = self._row(i), self._code(i)
        if not self.augment:
            return flat, flat, code
        a, b = torch.randint(0, N_PERMS, (2,)).tolist()
        return flat[self.perms[a]], flat[self.perms[b]], code


def activation_codes(activations, names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Per-member activation names -> (codes (n,) int64, the sorted names the codes index)."""
    names = names or sorted(set(map(str, activations)))
    return np.array([names.index(str(a)) for a in activations], np.int64), names


class ZooDataModule(L.LightningDataModule):
    """Train / val batches over one or several zoos: `paths`, `splits` and `codes` are per zoo."""

    def __init__(self, paths, splits, slots: list[int], batch_size: int, num_workers: int,
                 permuter: Permuter | None, permute: bool, reference: torch.Tensor | None = None, codes=None):
        super().__init__()
        single = isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__")
        self.paths = [paths] if single else list(paths)
        self.splits = [splits] if single else list(splits)
        self.codes = [codes] if single else list(codes if codes is not None else [None] * len(self.paths))
        self.slots, self.batch_size, self.num_workers = slots, batch_size, num_workers
        self.permuter, self.permute, self.reference = permuter, permute, reference

    def items(self, which: int) -> np.ndarray:
        """(n, 3) int64: (zoo, member, slot) of every item of a split."""
        out = [(k, m, s) for k, split in enumerate(self.splits) for m in np.flatnonzero(split == which)
               for s in self.slots]
        return np.array(out, dtype=np.int64).reshape(-1, 3)

    def _loader(self, which: int, shuffle: bool) -> DataLoader:
        ds = WeightViews(self.paths, self.items(which), self.permuter, self.permute and which == TRAIN,
                         self.reference, self.codes, seed=which)
        if len(ds) == 0:
            raise UsageError(f"the {['train', 'val', 'test'][which]} split is empty; use a larger zoo or other splits")
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          drop_last=shuffle and len(ds) > self.batch_size, persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        return self._loader(TRAIN, True)

    def val_dataloader(self):
        return self._loader(VAL, False)
