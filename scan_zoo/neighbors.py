"""SCAN stage 1: positive neighbours (paper Eq. 2-4).

``Sim(i, j) = 1[y_i == y_j] * (a_i . a_j + 1) / 2`` with ``a`` the L2-normalised pooled features of a
label-free model. Each image's positives are the top-K ``j != i`` by ``Sim`` with ``Sim > 0``: its K
nearest images of the same class. Mining goes class by class, so memory is bounded by the largest
class's Gram matrix (about 1,300 x 1,300 on ImageNet-1K), never N x N. The features may be a memory-mapped
array (``numpy.load(path, mmap_mode="r")``, float16 is fine): only one class's rows are read at a time, so
ImageNet's 1.28M x 2048 features (5.2 GB in float16) are mined without holding them in memory.

The table is saved as safetensors with its provenance (appearance model, K, image and class counts, a
fingerprint of the file list), and :func:`load_neighbors` refuses a table mined for another data set.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError

FORMAT = "scan_zoo.neighbors/1"


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
def mine_neighbors(features, labels: torch.Tensor, k: int, chunk: int = 4096,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
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
    from tqdm.auto import tqdm

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


def save_neighbors(path: str | Path, indices: torch.Tensor, sims: torch.Tensor, provenance: dict) -> Path:
    """Write the table with its provenance (strings in the safetensors header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "provenance": json.dumps(provenance, sort_keys=True)}
    tmp = path.with_name(path.name + ".tmp")
    save_file({"indices": indices.contiguous(), "similarities": sims.contiguous()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def check_table(indices: torch.Tensor, sims: torch.Tensor, source: str, num_images: Optional[int] = None,
                labels: Optional[torch.Tensor] = None) -> None:
    """Refuse a table :func:`mine_neighbors` cannot have written: ``indices`` an integer ``[N, K]`` of images
    ``0..N-1`` (``-1``: no neighbour), never the image itself, and (given its ``labels``) never another class;
    ``sims`` a float ``[N, K]``. ``num_images``: the N of the data set it is used with."""
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool or indices.dim() != 2:
        raise UserError(f"neighbour file {source}: 'indices' must be an integer [N, K] table, "
                        f"not {indices.dtype} of shape {tuple(indices.shape)}")
    n = indices.shape[0]
    if tuple(sims.shape) != tuple(indices.shape) or not sims.dtype.is_floating_point:
        raise UserError(f"neighbour file {source}: 'similarities' must be a float table shaped like 'indices' "
                        f"{tuple(indices.shape)}, not {sims.dtype} of shape {tuple(sims.shape)}")
    if num_images is not None and n != num_images:
        raise UserError(f"neighbour file {source} has {n} rows but the data set has {num_images} images; "
                        "mine again with `scan-zoo mine`")
    idx = indices.long()
    out = (idx < -1) | (idx >= n)
    if out.any():
        i, j = out.nonzero()[0].tolist()
        raise UserError(f"neighbour file {source}: image {i} has neighbour {int(idx[i, j])}, outside 0..{n - 1} "
                        "(-1 marks no neighbour)")
    rows = torch.arange(n)[:, None].expand_as(idx)
    own = idx == rows
    if own.any():
        i = int(own.nonzero()[0, 0])
        raise UserError(f"neighbour file {source}: image {i} is listed as its own neighbour")
    if labels is not None:
        labels = torch.as_tensor(labels).long()
        if len(labels) != n:
            raise UserError(f"neighbour file {source} has {n} rows but the data set has {len(labels)} images")
        valid = idx >= 0
        other = valid & (labels[idx.clamp(min=0)] != labels[rows])
        if other.any():
            i, j = other.nonzero()[0].tolist()
            raise UserError(f"neighbour file {source}: image {i} (class {int(labels[i])}) has neighbour "
                            f"{int(idx[i, j])} of class {int(labels[idx[i, j]])}; SCAN's neighbours are same-class")


def load_neighbors(path: str | Path, expect: Optional[dict] = None,
                   labels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Read a neighbour table and check it (:func:`check_table`, with the data set's ``labels`` when given);
    with ``expect`` (num_images, num_classes, fingerprint, k), refuse a mismatch of its provenance."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"neighbour file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            indices, sims = f.get_tensor("indices"), f.get_tensor("similarities")
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a neighbour file"
        raise UserError(f"{path} is not a neighbour file written by `scan-zoo mine`: {e}") from None
    if meta.get("format") != FORMAT or "provenance" not in meta:
        raise UserError(f"{path} is not a neighbour file written by `scan-zoo mine` (format {meta.get('format')!r})")
    try:
        prov = json.loads(meta["provenance"])
    except json.JSONDecodeError as e:
        raise UserError(f"neighbour file {path}: its provenance is not valid JSON ({e})") from None
    if not isinstance(prov, dict):
        raise UserError(f"neighbour file {path}: its provenance is not a JSON object")
    for key, want in (expect or {}).items():
        have = prov.get(key)
        if have != want:
            raise UserError(f"neighbour file {path} was mined for another data set or setting: "
                            f"{key} is {have!r} there but {want!r} here; mine again with `scan-zoo mine`")
    num_images = prov.get("num_images") if isinstance(prov.get("num_images"), int) else None
    check_table(indices, sims, str(path), num_images, labels)
    if isinstance(prov.get("k"), int) and indices.shape[1] != prov["k"]:
        raise UserError(f"neighbour file {path} holds {indices.shape[1]} neighbours per image but records K={prov['k']}")
    return indices.long(), sims, prov


def dataset_provenance(dataset, k: int, appearance_model: str) -> dict:
    """What a table must match: the data set's size, classes and file list, and K."""
    from .data import dataset_fingerprint

    return {"num_images": len(dataset.samples), "num_classes": len(dataset.classes),
            "fingerprint": dataset_fingerprint(dataset), "k": k, "appearance_model": appearance_model}
