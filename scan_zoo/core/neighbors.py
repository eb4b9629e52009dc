"""SCAN stage 1: positive neighbours (paper Eq. 2-4).

``Sim(i, j) = 1[y_i == y_j] * (a_i . a_j + 1) / 2`` with ``a`` the L2-normalised pooled features of a
label-free model. Each image's positives are the top-K ``j != i`` by ``Sim`` with ``Sim > 0``: its K
nearest images of the same class. Mining goes class by class, so memory is bounded by the largest
class's Gram matrix (about 1,300 x 1,300 on ImageNet-1K), never N x N. The features may be a memory-mapped
array (``numpy.load(path, mmap_mode="r")``, float16 is fine): only one class's rows are read at a time, so
ImageNet's 1.28M x 2048 features (5.2 GB in float16) are mined without holding them in memory.

Pure: features and labels in, index and similarity tables out. Saving, loading and checking a table is
:mod:`scan_zoo.data.neighbor_table`.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


def _unit_rows(features, members: torch.Tensor) -> torch.Tensor:
    """Rows ``members`` (ascending) of ``[N, D]`` features, L2-normalised, as a new float32 ``[m, D]`` tensor.

    A tensor is indexed; an array (a ``numpy.memmap``) is read only there: one slice when the class's rows
    are contiguous (ImageFolder order), else a gather of its rows. Conversion and normalisation (as
    ``F.normalize``) run in numpy, on one thread: on a shared 2-core machine these memory-bound passes took
    4x longer split over torch's OpenMP threads (benchmarks/RESULTS.md, mining).
    """
    if isinstance(features, torch.Tensor):
        rows = features[members].float().cpu().numpy()  # [m, D] a copy (indexing copies)
    else:
        lo, hi = int(members[0]), int(members[-1]) + 1
        rows = features[lo:hi] if hi - lo == len(members) else features[members.numpy()]
        rows = np.array(rows, dtype=np.float32)  # [m, D] a writable copy, converted while read
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))  # [m]
    rows /= np.maximum(norms, np.float32(1e-12))[:, None]
    return torch.from_numpy(rows)


def _top_k(gram: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``kk`` largest entries of each row, in decreasing order, equal values by increasing column.

    The same as a stable descending sort cut at ``kk`` (the slow reference, ~10x the cost of the Gram
    product it follows), from one ``topk(kk + 1)``: where the (kk+1)-th value is below the kk-th, the set
    is exact and only its order among equal values is fixed here; rows with a tie across the cut (rare
    outside duplicated images) fall back to the stable sort. ``kk < gram.shape[1]``.
    """
    val, pos = torch.topk(gram, kk + 1, dim=1)  # [c, kk + 1] values descending; order of equal values unspecified
    cut = val[:, kk] == val[:, kk - 1]  # [c] a tie across the cut: which of them is chosen matters
    val, pos = val[:, :kk], pos[:, :kk]
    by_pos = pos.argsort(dim=1)  # equal values to increasing column: order by column, then a stable sort by value
    val, pos = val.gather(1, by_pos), pos.gather(1, by_pos)
    by_val = val.sort(dim=1, descending=True, stable=True).indices
    val, pos = val.gather(1, by_val), pos.gather(1, by_val)
    if cut.any():
        v, p = torch.sort(gram[cut], dim=1, descending=True, stable=True)
        val[cut], pos[cut] = v[:, :kk], p[:, :kk]
    return val, pos


@torch.no_grad()
def mine_neighbors(
    features, labels: torch.Tensor, k: int, chunk: int = 4096, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class top-K neighbours by cosine similarity.

    Args:
        features: ``[N, D]`` appearance features: a tensor, or an array such as ``numpy.load(path,
            mmap_mode="r")`` read one class at a time (any float dtype; normalised here in float32).
        labels: ``[N]`` integer class labels, in any order.
        k: neighbours per image.
        chunk: rows of a class's Gram matrix computed at once (bounds memory for huge classes).
    Returns:
        ``(indices int64 [N, K], similarities float32 [N, K])``; ``-1`` / ``0`` where the class has
        fewer than K + 1 images. Similarities are ``Sim_A = (cos + 1) / 2``. Rows are sorted by
        decreasing similarity, ties broken by the lower index.
    """
    n = features.shape[0]
    labels = torch.as_tensor(labels).long()
    indices = torch.full((n, k), -1, dtype=torch.long)  # [N, K]
    sims = torch.zeros((n, k), dtype=torch.float32)  # [N, K]
    if k == 0 or n == 0:
        return indices, sims
    order = torch.argsort(labels, stable=True)  # images grouped by class, in index order within a class
    counts = torch.bincount(labels[order] - labels.min()) if n else torch.zeros(0)
    classes = [c for c in torch.split(order, counts[counts > 0].tolist())]
    for members in tqdm(classes, desc="mining neighbours", disable=not progress, unit="class"):
        m = len(members)
        kk = min(k, m - 1)
        if kk <= 0:
            continue
        feats = _unit_rows(features, members)  # [m, D] float32, unit rows
        for lo in range(0, m, chunk):
            hi = min(lo + chunk, m)
            gram = feats[lo:hi] @ feats.T  # [c, m] cosine similarities
            gram[torch.arange(hi - lo), torch.arange(lo, hi)] = float("-inf")  # j != i
            val, pos = _top_k(gram, kk)  # [c, kk] ties to the lower position
            sim_a = (val + 1) / 2  # Eq. 3
            keep = sim_a > 0  # Eq. 4: only neighbours with non-zero similarity
            indices[members[lo:hi], :kk] = torch.where(keep, members[pos], torch.full_like(pos, -1))
            sims[members[lo:hi], :kk] = torch.where(keep, sim_a, torch.zeros_like(sim_a))
    return indices, sims
