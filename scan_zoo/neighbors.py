"""SCAN stage 1: positive neighbours (paper Eq. 2-4).

``Sim(i, j) = 1[y_i == y_j] * (a_i . a_j + 1) / 2`` with ``a`` the L2-normalised pooled features of a
label-free model. Each image's positives are the top-K ``j != i`` by ``Sim`` with ``Sim > 0``: its K
nearest images of the same class. Mining goes class by class, so memory is bounded by the largest
class's Gram matrix (about 1,300 x 1,300 on ImageNet-1K), never N x N.

The table is saved as safetensors with its provenance (appearance model, K, image and class counts, a
fingerprint of the file list), and :func:`load_neighbors` refuses a table mined for another data set.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError

FORMAT = "scan_zoo.neighbors/1"


@torch.no_grad()
def mine_neighbors(features: torch.Tensor, labels: torch.Tensor, k: int, chunk: int = 4096,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class top-K neighbours by cosine similarity.

    Args:
        features: ``[N, D]`` appearance features (any float dtype; normalised here).
        labels: ``[N]`` integer class labels.
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
        feats = F.normalize(features[members].float(), dim=1)  # [m, D]
        for lo in range(0, m, chunk):
            hi = min(lo + chunk, m)
            gram = feats[lo:hi] @ feats.T  # [c, m] cosine similarities
            gram[torch.arange(hi - lo), torch.arange(lo, hi)] = float("-inf")  # j != i
            # ties: topk on (sim, -position) made exact by a stable sort
            val, pos = torch.sort(gram, dim=1, descending=True, stable=True)
            val, pos = val[:, :kk], pos[:, :kk]  # [c, kk]
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


def load_neighbors(path: str | Path, expect: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Read a neighbour table; with ``expect`` (num_images, num_classes, fingerprint, k), refuse a mismatch."""
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
    prov = json.loads(meta["provenance"])
    for key, want in (expect or {}).items():
        have = prov.get(key)
        if have != want:
            raise UserError(f"neighbour file {path} was mined for another data set or setting: "
                            f"{key} is {have!r} there but {want!r} here; mine again with `scan-zoo mine`")
    return indices, sims, prov


def dataset_provenance(dataset, k: int, appearance_model: str) -> dict:
    """What a table must match: the data set's size, classes and file list, and K."""
    from .data import dataset_fingerprint

    return {"num_images": len(dataset.samples), "num_classes": len(dataset.classes),
            "fingerprint": dataset_fingerprint(dataset), "k": k, "appearance_model": appearance_model}
