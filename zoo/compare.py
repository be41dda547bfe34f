"""How alike are two sets of members? Distances in weight space (raw and after weight matching) and in
function space (which test images they get wrong, how often they agree).

    near = nearest(A, B, permuter)        # for each row of A: the closest row of B, raw and aligned L2
    iou = error_iou(wrong_a, wrong_b)     # (n, m) IoU of the sets of misclassified test images
    agree = agreement(pred_a, pred_b)     # (n, m) fraction of test images with the same prediction

Raw L2 overstates how new a member is when it is a permuted copy: the aligned distance weight-matches
candidates first (`zoo.symmetry.Permuter`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .symmetry import Permuter


def l2_distances(A, B, chunk: int = 1024) -> np.ndarray:
    """(n, P), (m, P) -> (n, m) Euclidean distances, float64."""
    A, B = torch.as_tensor(np.asarray(A), dtype=torch.float64), torch.as_tensor(np.asarray(B), dtype=torch.float64)
    return torch.cat([torch.cdist(A[a:a + chunk], B) for a in range(0, len(A), chunk)]).numpy()


def canonical(W, permuter: Permuter, reference) -> np.ndarray:
    """Every row weight-matched onto one reference member: a canonical form in which permuted copies coincide."""
    ref = torch.as_tensor(np.asarray(reference, np.float32))
    return np.stack([permuter.align(torch.as_tensor(np.asarray(w, np.float32)), ref).numpy() for w in W])


@dataclass
class Nearest:
    raw_l2: np.ndarray  # (n,) distance to the nearest row of B
    raw_index: np.ndarray  # (n,) which row
    aligned_l2: np.ndarray | None  # (n,) after weight matching (None without a permuter)
    aligned_index: np.ndarray | None


def nearest(A, B, permuter: Permuter | None = None, candidates: int = 5) -> Nearest:
    """Nearest row of B for each row of A. Aligned: both sets are brought to a canonical form (matched onto
    B[0]) to find `candidates` close rows of B, and each row of A is then weight-matched onto each candidate
    itself; the smallest distance wins (a permuted copy of a row of B gets ~0)."""
    A, B = np.asarray(A, np.float32), np.asarray(B, np.float32)
    raw = l2_distances(A, B)
    out = Nearest(raw.min(1), raw.argmin(1), None, None)
    if permuter is None or not permuter.couplings:
        return out
    ca, cb = canonical(A, permuter, B[0]), canonical(B, permuter, B[0])
    cand = np.argsort(l2_distances(ca, cb), 1)[:, :candidates]  # (n, k)
    best = np.full(len(A), np.inf)
    index = np.zeros(len(A), np.int64)
    for i, row in enumerate(A):
        for j in cand[i]:
            d = float(np.linalg.norm(permuter.align(torch.from_numpy(row), torch.from_numpy(B[j])).numpy() - B[j]))
            if d < best[i]:
                best[i], index[i] = d, j
    out.aligned_l2, out.aligned_index = np.minimum(best, out.raw_l2), np.where(best < out.raw_l2, index, out.raw_index)
    return out


def error_iou(wrong_a: np.ndarray, wrong_b: np.ndarray) -> np.ndarray:
    """(n, N), (m, N) bool: which test images each member gets wrong -> (n, m) intersection over union
    (two members that are never wrong count as identical: IoU 1)."""
    a, b = torch.as_tensor(wrong_a, dtype=torch.float32), torch.as_tensor(wrong_b, dtype=torch.float32)
    inter = a @ b.T
    union = a.sum(1, keepdim=True) + b.sum(1)[None] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter)).numpy()


def agreement(pred_a: np.ndarray, pred_b: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """(n, N), (m, N) int predictions -> (n, m) fraction of images with the same prediction."""
    k = num_classes or int(max(pred_a.max(initial=0), pred_b.max(initial=0))) + 1
    a, b = torch.as_tensor(pred_a), torch.as_tensor(pred_b)
    same = sum((a == c).float() @ (b == c).float().T for c in range(k))  # one (n, N) @ (N, m) per class
    return (same / a.shape[1]).numpy()
