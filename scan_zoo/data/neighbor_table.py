"""The neighbour table on disk: safetensors ``indices`` [N, K] and ``sims`` [N, K] with their provenance
(appearance model, K, image and class counts, a fingerprint of the file list). :func:`load_neighbors`
checks every entry and refuses a table mined for another data set; mining itself is
:func:`scan_zoo.core.neighbors.mine_neighbors`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from scan_zoo.common.errors import UserError
from scan_zoo.data.datasets import dataset_fingerprint

FORMAT = "scan_zoo.neighbors/1"


def save_neighbors(path: str | Path, indices: torch.Tensor, sims: torch.Tensor, provenance: dict) -> Path:
    """Write the table with its provenance (strings in the safetensors header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "provenance": json.dumps(provenance, sort_keys=True)}
    tmp = path.with_name(path.name + ".tmp")
    save_file({"indices": indices.contiguous(), "similarities": sims.contiguous()}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def check_table(
    indices: torch.Tensor,
    sims: torch.Tensor,
    source: str,
    num_images: int | None = None,
    labels: torch.Tensor | None = None,
) -> None:
    """Refuse a table :func:`mine_neighbors` cannot have written: ``indices`` an integer ``[N, K]`` of images
    ``0..N-1`` (``-1``: no neighbour), never the image itself, and (given its ``labels``) never another class;
    ``sims`` a float ``[N, K]``. ``num_images``: the N of the data set it is used with."""
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool or indices.dim() != 2:
        raise UserError(
            f"neighbour file {source}: 'indices' must be an integer [N, K] table, "
            f"not {indices.dtype} of shape {tuple(indices.shape)}"
        )
    n = indices.shape[0]
    if tuple(sims.shape) != tuple(indices.shape) or not sims.dtype.is_floating_point:
        raise UserError(
            f"neighbour file {source}: 'similarities' must be a float table shaped like 'indices' "
            f"{tuple(indices.shape)}, not {sims.dtype} of shape {tuple(sims.shape)}"
        )
    if num_images is not None and n != num_images:
        raise UserError(
            f"neighbour file {source} has {n} rows but the data set has {num_images} images; "
            "mine again with `scan-zoo mine`"
        )
    idx = indices.long()
    out = (idx < -1) | (idx >= n)
    if out.any():
        i, j = out.nonzero()[0].tolist()
        raise UserError(
            f"neighbour file {source}: image {i} has neighbour {int(idx[i, j])}, outside 0..{n - 1} "
            "(-1 marks no neighbour)"
        )
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
            raise UserError(
                f"neighbour file {source}: image {i} (class {int(labels[i])}) has neighbour "
                f"{int(idx[i, j])} of class {int(labels[idx[i, j]])}; SCAN's neighbours are same-class"
            )


def load_neighbors(
    path: str | Path, expect: dict | None = None, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict]:
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
            raise UserError(
                f"neighbour file {path} was mined for another data set or setting: "
                f"{key} is {have!r} there but {want!r} here; mine again with `scan-zoo mine`"
            )
    num_images = prov.get("num_images") if isinstance(prov.get("num_images"), int) else None
    check_table(indices, sims, str(path), num_images, labels)
    if isinstance(prov.get("k"), int) and indices.shape[1] != prov["k"]:
        raise UserError(
            f"neighbour file {path} holds {indices.shape[1]} neighbours per image but records K={prov['k']}"
        )
    return indices.long(), sims, prov


def dataset_provenance(dataset, k: int, appearance_model: str) -> dict:
    """What a table must match: the data set's size, classes and file list, and K."""
    return {
        "num_images": len(dataset.samples),
        "num_classes": len(dataset.classes),
        "fingerprint": dataset_fingerprint(dataset),
        "k": k,
        "appearance_model": appearance_model,
    }
