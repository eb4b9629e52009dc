"""Datasets and the neighbour batch sampler (the transforms are :mod:`scan_zoo.data.transforms`).

Every method reads its data the same way: an ImageFolder split (the digit scenes are one), wrapped so
that each sample's augmentation is a pure function of ``(seed, epoch, slot)``. That makes a resumed run
see exactly the crops it would have seen, whatever the number of workers or where it stopped.

Batches come from :class:`NeighborBatchSampler`: each epoch every training image is an anchor exactly
once; each anchor is followed by its K positive neighbours (K = 0 for every method but SCAN), and each
process takes its own shard of every step.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets

from scan_zoo.common.errors import UserError
from scan_zoo.data.digits import ensure_digits
from scan_zoo.data.folders import SafeImageFolder
from scan_zoo.data.imageio import UnreadableImage, display_path, rgb_loader

# re-exported: callers read the transforms as data_lib.<name>
from scan_zoo.data.transforms import (  # noqa: F401
    IMAGENET_MEAN,
    IMAGENET_STD,
    GaussianBlur,
    MultiView,
    ToNormalizedTensor,
    eval_transform,
    gaussian_blur,
    gaussian_blur_image,
    gaussian_kernels,
    moco_v2_transform,
    supervised_transform,
)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- datasets
def image_folder(root: str | Path, split: str) -> datasets.ImageFolder:
    """``root/split`` as an ImageFolder listed safely (:class:`scan_zoo.data.folders.SafeImageFolder`), with a clear
    error when it is not one and one warning each for what its listing left out.

    The data set's ``skipped`` lists (path, reason) for files with an image name that are not regular files
    (FIFOs, sockets, devices, dangling links): never opened, and refused by ``--strict-data``."""
    path = Path(root) / split
    if not Path(root).is_dir():
        raise UserError(f"data directory not found: {display_path(root)}")
    if not path.is_dir():
        raise UserError(
            f"data directory {display_path(root)} has no '{split}' folder "
            f"(expected ImageNet layout: {split}/<class>/<image>)"
        )
    try:
        ds = SafeImageFolder(str(path), loader=rgb_loader, allow_empty=True)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"cannot read {display_path(path)} as an ImageFolder: {display_path(str(e))}") from None
    _warn_left_out(ds, path)
    if not ds.samples:
        raise UserError(f"{display_path(path)} holds no images (expected {split}/<class>/<image>)")
    counts = np.bincount(ds.targets, minlength=len(ds.classes))
    empty = [display_path(c) for c, n in zip(ds.classes, counts) if n == 0]
    if empty:
        logger.warning(
            "%s: %d empty class folder(s) kept as classes without images: %s",
            display_path(path),
            len(empty),
            ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""),
        )
    return ds


def _warn_left_out(ds: SafeImageFolder, path: Path, show: int = 5) -> None:
    """One warning for the files a listing left out and one for the directories it did not follow."""

    def names(items):
        shown = [f"{display_path(os.path.relpath(p, path))} ({why})" for p, why in items[:show]]
        return "; ".join(shown) + (f"; and {len(items) - show} more" if len(items) > show else "")

    if ds.skipped:
        logger.warning(
            "%s: %d file(s) with an image name left out as not regular files: %s",
            display_path(path),
            len(ds.skipped),
            names(ds.skipped),
        )
    if ds.unfollowed:
        logger.warning(
            "%s: %d folder(s) not listed (each would repeat a folder or bring in images from "
            "outside its class folder): %s",
            display_path(path),
            len(ds.unfollowed),
            names(ds.unfollowed),
        )


class DecodedCache:
    """An ImageFolder loader that keeps a small data set's decoded pixels in memory (each process its own).

    A digit scene costs 0.1 ms to decode, about 8 % of a loader worker's work per sample; with persistent
    workers each image is then decoded once per worker, not once per epoch. Every read checks the file's size
    and modification time, so a file replaced or broken during a run is read (and, broken, skipped) as before.
    At most ``max_bytes`` of pixels are kept; the images are exactly what :func:`rgb_loader` returns.
    """

    MAX_IMAGES = 20_000  # larger data sets are not cached (see cache_small_dataset)

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes, self.used, self.items = max_bytes, 0, {}

    def __call__(self, path: str) -> Image.Image:
        try:
            st = os.stat(path)
        except OSError:
            return rgb_loader(path)  # raises UnreadableImage, naming the file
        key = (st.st_size, st.st_mtime_ns)
        hit = self.items.get(path)
        if hit is not None and hit[0] == key:
            return Image.fromarray(hit[1])  # [H, W, 3] uint8, shared (PIL copies before any change)
        img = rgb_loader(path)
        if hit is not None:  # the file changed
            self.used -= hit[1].nbytes
            del self.items[path]
        pixels = np.asarray(img)
        if self.used + pixels.nbytes <= self.max_bytes:
            self.items[path] = (key, pixels)
            self.used += pixels.nbytes
        return img


def cache_small_dataset(ds: datasets.ImageFolder) -> datasets.ImageFolder:
    """Give a data set of at most ``DecodedCache.MAX_IMAGES`` images a :class:`DecodedCache` loader (in place)."""
    if len(ds.samples) <= DecodedCache.MAX_IMAGES and ds.loader is rgb_loader:
        ds.loader = DecodedCache()
    return ds


def resolve_data_root(data: str, cache: str | None = None, progress: bool = True) -> Path:
    """'digits' renders (once) and returns the digit-scenes tree; anything else is an ImageFolder root."""
    if data == "digits":
        return ensure_digits(cache, progress=progress)
    return Path(data)


def dataset_fingerprint(ds: datasets.ImageFolder) -> str:
    """sha256 over the relative file list (the names' bytes) and labels: identifies a data set without reading
    its pixels."""
    h = hashlib.sha256()
    for path, label in ds.samples:
        h.update(os.fsencode(Path(path).relative_to(ds.root).as_posix()) + f"\t{label}\n".encode())
    return h.hexdigest()


class SeededViews(Dataset):
    """Wraps a dataset of (PIL image, label); item ``(index, aug_seed, group)`` gives views made under that seed.

    Returns ``(views, label, index, group, skipped)`` with ``views`` a list of tensors [3, H, W],
    ``group`` the pseudo-label the sampler gave this slot and ``skipped`` None, or the reason an unreadable
    file was skipped (``views`` is then None and the collate function drops the slot).
    The torch RNG is forked, so the caller's random state is left untouched.
    """

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    @property
    def targets(self) -> list:
        return self.base.targets

    def __getitem__(self, item):
        index, aug_seed, group = item if isinstance(item, tuple) else (item, item, item)
        try:
            img, label = self.base[index]
        except UnreadableImage as e:
            return None, self.base.targets[index], index, group, str(e)
        with torch.random.fork_rng(devices=[]):
            # the transforms draw from the CPU generator only; torch.manual_seed would also (lazily) seed every
            # CUDA device, ~0.16 ms per call (7 % of a digit sample's work, benchmarks/data.py --profile)
            torch.default_generator.manual_seed(aug_seed)
            views = self.transform(img)
        if not isinstance(views, list):
            views = [views]
        return views, label, index, group, None


class EvalImages(Dataset):
    """(tensor [3, H, W], label, index) under a deterministic evaluation transform."""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        try:
            img, label = self.base[index]
        except UnreadableImage as e:  # keep the row (tables are indexed by image); a blank image stands in
            logger.warning("unreadable image replaced by a blank one for evaluation: %s", e)
            img, label = Image.new("RGB", (64, 64)), self.base.targets[index]
        return self.transform(img), label, index


def collate_views(batch):
    """[(views, label, index, group, skipped)] -> dict(views=[tensor [B, 3, H, W]] * n, label, index, group [B],
    skipped=[reasons]); slots whose image could not be read are dropped. When none could be read the batch is
    ``dict(skipped, index=[])`` (empty ``index``): the training loop skips that step (Trainer._unreadable_step)."""
    skipped = [s for *_, s in batch if s is not None]
    batch = [b[:4] for b in batch if b[4] is None]
    if not batch:
        return {"skipped": skipped, "index": torch.empty(0, dtype=torch.long)}
    views, labels, index, group = zip(*batch)
    n = len(views[0])
    return {
        "skipped": skipped,
        "views": [torch.stack([v[i] for v in views]) for i in range(n)],
        "label": torch.as_tensor(labels, dtype=torch.long),
        "index": torch.as_tensor(index, dtype=torch.long),
        "group": torch.as_tensor(group, dtype=torch.long),
    }


# ---------------------------------------------------------------------------------------------- sampler
def _mix(*ints: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = hashlib.blake2b(",".join(map(str, ints)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class NeighborBatchSampler:
    """Batches of anchors, each followed by its K neighbours, sharded over processes.

    Each epoch a seeded permutation of all N images gives the anchors. The epoch has
    ``ceil(N / (S * world))`` steps; the anchors are spread over the steps and, within a step, over the
    processes as evenly as possible (sizes differ by at most one), so every anchor is used exactly once
    per epoch and nothing is padded or dropped. A process's batch at one step is
    ``[a_1, n_11 .. n_1K, a_2, n_21 .. n_2K, ...]``.

    Each yielded element is ``(index, aug_seed, group)``, ``group`` being the pseudo-label y* of the
    slot: the anchor's position in the epoch, unique across processes. Missing neighbours (``-1`` in the table: a class
    with fewer than K + 1 images) are replaced by the anchor itself, which is a positive anyway.

    Args:
        num_images: N.
        anchors_per_batch: S, anchors per process per step.
        neighbors: ``int64 [N, K]`` table, or None for K = 0.
        rank, world_size: this process and the number of processes.
        seed: base seed; the permutation and augmentation seeds derive from ``(seed, epoch, ...)``.
    """

    def __init__(
        self,
        num_images: int,
        anchors_per_batch: int,
        neighbors: torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if neighbors is not None and neighbors.shape[0] != num_images:
            raise ValueError(f"neighbour table has {neighbors.shape[0]} rows for {num_images} images")
        if num_images < world_size:
            raise UserError(f"{num_images} training images cannot be shared by {world_size} processes")
        self.num_images, self.anchors, self.seed = num_images, anchors_per_batch, seed
        self.neighbors = neighbors.long() if neighbors is not None else torch.empty(num_images, 0, dtype=torch.long)
        self.rank, self.world = rank, world_size
        self.epoch, self.start_step = 0, 0
        if num_images // len(self) < world_size:  # the smallest step must give every process an anchor
            raise UserError(
                f"{num_images} images in steps of {anchors_per_batch} anchors x {world_size} processes "
                "leave some process an empty batch: use at least 2 anchors per process"
            )

    @property
    def k(self) -> int:
        return self.neighbors.shape[1]

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch, and the step to start from when resuming in the middle of it."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        """Steps per epoch (the same on every process)."""
        return math.ceil(self.num_images / (self.anchors * self.world))

    def _bounds(self, step: int) -> tuple[int, int]:
        """This process's [start, end) slice of the epoch's anchor permutation at ``step``."""
        steps = len(self)
        lo = step * self.num_images // steps  # the step's slice of the permutation
        hi = (step + 1) * self.num_images // steps
        n = hi - lo
        return lo + self.rank * n // self.world, lo + (self.rank + 1) * n // self.world

    def permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, 17))
        return torch.randperm(self.num_images, generator=g)  # [N] anchors of this epoch

    def batch(self, step: int, perm: torch.Tensor | None = None) -> list[tuple[int, int, int]]:
        """Elements ``(index, aug_seed, group)`` of this process at ``step`` of the current epoch."""
        perm = self.permutation() if perm is None else perm
        start, end = self._bounds(step)
        anchors = perm[start:end]  # [S']
        table = self.neighbors[anchors]  # [S', K]
        table = torch.where(table < 0, anchors[:, None], table)
        idx = torch.cat([anchors[:, None], table], 1).reshape(-1)  # [S' (K + 1)]
        groups = torch.arange(start, end).repeat_interleave(self.k + 1)  # [S' (K + 1)] pseudo-labels
        slots = torch.arange(start * (self.k + 1), end * (self.k + 1))
        return [(int(i), _mix(self.seed, self.epoch, int(s)), int(g)) for i, s, g in zip(idx, slots, groups)]

    def __iter__(self) -> Iterator[list]:
        perm = self.permutation()
        for step in range(self.start_step, len(self)):
            yield self.batch(step, perm)


def make_loader(
    dataset: Dataset,
    sampler: NeighborBatchSampler,
    num_workers: int = 2,
    pin_memory: bool = False,
    collate_fn=collate_views,
) -> "torch.utils.data.DataLoader":
    # persistent workers: no start-up every epoch (0.7 s against a 10 s epoch of the digit scenes, 2 workers)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )
