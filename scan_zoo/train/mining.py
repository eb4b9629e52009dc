"""SCAN stage 1 end to end: appearance features of the training set from a label-free model, then the
per-class neighbour table (:mod:`scan_zoo.core.neighbors`), saved with its provenance.

Small data sets keep the features in memory. Above :data:`FEATURES_IN_MEMORY_MAX_BYTES` (ImageNet-1K with a
ResNet-50: 1.28M x 2048 float32 = 10.5 GB) each process writes its shard of the features into one file beside
the table instead of all-gathering them into every process's memory, and the main process mines that file,
memory-mapped, one class at a time (``benchmarks/mine.py``); the file is removed afterwards.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from scan_zoo.common import distributed as dist_lib
from scan_zoo.common.errors import UserError
from scan_zoo.common.files import sha256_file
from scan_zoo.core.neighbors import mine_neighbors
from scan_zoo.data import datasets as data_lib
from scan_zoo.data.neighbor_table import (
    dataset_provenance,
    load_neighbors,
    save_neighbors,
)
from scan_zoo.models.backbones import check_input_size, pooled_dim
from scan_zoo.models.features import extract_features
from scan_zoo.models.loading import load_backbone

logger = logging.getLogger(__name__)

#: float32 features larger than this are extracted into a file and mined memory-mapped
FEATURES_IN_MEMORY_MAX_BYTES = 2 << 30


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_k(k: int) -> None:
    """A neighbour table holds K >= 0 neighbours per image; K = -1 (every same-class image) has no table."""
    if k < 0:
        raise UserError(
            f"K (--k) must be >= 0 neighbours per image, not {k} (K = -1, every same-class image "
            "a positive, is --method supcon, which needs no neighbour table)"
        )


@torch.no_grad()
def extract_to_file(
    backbone, images, path: Path, batch_size: int, num_workers: int, device, progress: bool = True
) -> np.ndarray:
    """Pooled float32 features of ``images`` (yielding ``(image, label, index)``) written into the ``.npy`` file
    ``path``, ``[N, D]`` in data set order: each process its contiguous shard, nothing gathered. Every
    process calls it; returns the file memory-mapped read-only. The numbers are :func:`extract_features`'s."""

    world, rank = dist_lib.world_size(), dist_lib.rank()
    n = len(images)
    if rank == 0:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, pooled_dim(backbone))).flush()
    _barrier()
    out = np.load(path, mmap_mode="r+")  # [N, D]
    lo, hi = rank * n // world, (rank + 1) * n // world
    loader = DataLoader(Subset(images, range(lo, hi)), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = backbone.training
    backbone.eval()
    for x, _, index in tqdm(
        loader, desc="appearance features", disable=not progress or rank != 0, unit="batch", leave=False
    ):
        out[index.numpy()] = backbone(x.to(device)).float().cpu().numpy()  # [b, D] rows of these images
    backbone.train(was_training)
    out.flush()
    del out
    _barrier()
    return np.load(path, mmap_mode="r")


def mine_dataset(
    appearance_model: str,
    data_root: Path,
    out: Path,
    k: int,
    image_size: int,
    eval_resize: int | None = None,
    arch: str | None = None,
    accelerator=None,
    batch_size: int = 256,
    num_workers: int = 2,
    base=None,
    in_memory_max_bytes: int = FEATURES_IN_MEMORY_MAX_BYTES,
) -> torch.Tensor:
    """Extract features of ``data_root/train`` with ``appearance_model`` and mine its top-K table into ``out``.

    With several processes each extracts a shard; the main process mines and writes; all return the table.
    ``base`` is the train split's ImageFolder when the caller has it already (listing ImageNet takes a while).
    """
    main = accelerator is None or accelerator.is_main_process
    check_k(k)
    base = base if base is not None else data_lib.image_folder(data_root, "train")
    targets = torch.as_tensor(base.targets).long()  # [N]
    largest = int(torch.bincount(targets).max()) if len(targets) else 0
    if k > 0 and k >= largest:
        raise UserError(
            f"K={k} neighbours per image, but the largest class of {data_root} has {largest} "
            f"training images (at most {largest - 1} neighbours each): use a smaller --k"
        )
    backbone, desc = load_backbone(appearance_model, arch=arch)
    check_input_size(backbone, image_size, desc)
    prov = dataset_provenance(base, k, desc)
    if Path(desc).is_file():  # identify the weights by content, not only by path
        prov["appearance_sha256"] = sha256_file(Path(desc))
    if Path(out).is_file():  # mined before (a resumed run): reuse it if it was mined the same way
        try:
            return load_neighbors(out, prov, labels=targets)[0]
        except UserError:
            pass
    device = accelerator.device if accelerator is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    images = data_lib.EvalImages(base, data_lib.eval_transform(image_size, eval_resize))
    feature_file = None
    if len(images) * pooled_dim(backbone) * 4 > in_memory_max_bytes:
        feature_file = Path(out).with_name(Path(out).stem + ".features.npy")
        feature_file.parent.mkdir(parents=True, exist_ok=True)
        feats = extract_to_file(backbone.to(device), images, feature_file, batch_size, num_workers, device, main)
        labels = targets  # what EvalImages yields
    else:
        feats, labels = extract_features(
            backbone.to(device), images, batch_size, num_workers, device, desc="appearance features", progress=main
        )
    if main:
        indices, sims = mine_neighbors(feats, labels, k, progress=True)
        save_neighbors(out, indices, sims, prov)
        logger.info("mined %d neighbours for %d images into %s", k, len(indices), out)
    del feats
    if feature_file is not None and main:
        feature_file.unlink()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    expect = {key: prov[key] for key in ("num_images", "num_classes", "fingerprint", "k")}
    return load_neighbors(out, expect, labels=targets)[0]


def neighbors_for(cfg, data_root: Path, run_dir: Path, accelerator=None) -> torch.Tensor:
    """The neighbour table a SCAN run needs: the file named by ``cfg.neighbors``, checked against the data,
    or mined now from ``cfg.appearance_model`` into ``run_dir/neighbors.safetensors``."""
    base = data_lib.image_folder(data_root, "train")
    if cfg.neighbors:
        prov = dataset_provenance(base, cfg.k, "")
        expect = {key: prov[key] for key in ("num_images", "num_classes", "fingerprint", "k")}
        return load_neighbors(cfg.neighbors, expect, labels=torch.as_tensor(base.targets))[0]
    if cfg.appearance_model:
        return mine_dataset(
            cfg.appearance_model,
            data_root,
            Path(run_dir) / "neighbors.safetensors",
            cfg.k,
            cfg.image_size,
            cfg.eval_resize,
            arch=cfg.model,
            accelerator=accelerator,
            base=base,
        )
    raise UserError(
        "--method scan needs positive neighbours: pass --neighbors FILE (from `scan-zoo mine`) or "
        "--appearance-model MODEL (a label-free model, e.g. a MoCo run directory, to mine them with); "
        "or run the whole pipeline with --method pipeline"
    )
