"""The linear layer of both probe protocols: main_lincls.py's head, SGD with its step schedule, and the
epochs of training data (cached features or augmented crops), seeded per epoch.

Reproducible to the bit on a CPU: the layer is trained in float64 (:data:`LINEAR_DTYPE`) on one thread
(:func:`fixed_threads`), so neither the thread count (``OMP_NUM_THREADS``, ``torch.set_num_threads``) nor
the number of processes changes a number: with more threads the reductions of the matmuls are split
differently, and over 100 epochs at lr 30 those one-ulp differences moved linear top-1 of the shipped
digits entries by up to 0.28 points between 1 and 2 threads (float32).
Several processes each train the same layer on the same data (no collective), so every process ends
with the same classifier and nothing can deadlock.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from scan_zoo.common import distributed as dist_lib
from scan_zoo.core import metrics as evaluation
from scan_zoo.data import datasets as data_lib
from scan_zoo.eval.probe_config import LR_DECAY, ProbeConfig, train_transform

logger = logging.getLogger(__name__)

PROBE_THREADS = 1  # CPU threads of every probe computation: results independent of the caller's setting
LINEAR_DTYPE = torch.float64  # the linear layer and its inputs


@contextlib.contextmanager
def fixed_threads(n: int = PROBE_THREADS):
    """Run the block on ``n`` CPU threads (torch's intra-op pool), then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_classifier(dim: int, num_classes: int, seed: int = 0, dtype: torch.dtype = LINEAR_DTYPE) -> nn.Linear:
    """main_lincls.py's head: ``fc.weight.normal_(0, 0.01)``, ``fc.bias.zero_()``."""
    fc = nn.Linear(dim, num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(num_classes, dim, generator=g) * 0.01)  # [C, D]
        fc.bias.zero_()
    return fc.to(dtype)


def lr_at(epoch: int, lr: float, milestones: Iterable[int]) -> float:
    """main_lincls.py's adjust_learning_rate: ``lr * 0.1`` for each milestone ``<= epoch`` (from 0)."""
    return lr * LR_DECAY ** sum(epoch >= m for m in milestones)


def train_epoch(classifier: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable) -> float:
    """One pass of SGD on cross-entropy; ``batches`` yields ``(features [B, D], labels [B])``. Mean loss."""
    classifier.train()
    total, n = 0.0, 0
    for x, y in batches:
        loss = F.cross_entropy(classifier(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, n = total + loss.item() * len(y), n + len(y)
    return total / max(n, 1)


@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 / top-5 (percent) of ``classifier`` on ``features [M, D]``."""
    classifier.eval()
    return evaluation.topk_accuracy(classifier(features.to(classifier.weight.dtype)).cpu(), labels.cpu())


def fit_linear(
    epoch_batches: Callable[[int], Iterable],
    dim: int,
    num_classes: int,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    cfg: ProbeConfig,
    device="cpu",
    dtype: torch.dtype = LINEAR_DTYPE,
) -> tuple[nn.Linear, list[dict]]:
    """Train the linear layer for ``cfg.epochs`` on ``epoch_batches(epoch)``; validate after every epoch.

    ``dtype``: the layer's (and its inputs'); float64 for eval_linear.py, float32 where recorded results were
    measured with a float32 layer (the transfer suite's semantic task).

    Returns ``(classifier, history)``, ``history[e] = {"epoch", "lr", "loss", "top1", "top5"}``.
    """
    classifier = make_classifier(dim, num_classes, cfg.seed, dtype).to(device)
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    val_features, val_labels = val_features.to(device, dtype), val_labels.to(device)  # [M, D], [M]
    history = []
    bar = tqdm(
        range(cfg.epochs),
        desc=f"linear ({cfg.protocol})",
        unit="epoch",
        disable=not cfg.progress or dist_lib.rank() != 0,
    )
    for epoch in bar:
        lr = lr_at(epoch, cfg.lr, cfg.milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = train_epoch(classifier, optimizer, epoch_batches(epoch))
        if not math.isfinite(loss):
            logger.warning("linear probe: non-finite training loss at epoch %d (lr %g)", epoch + 1, lr)
        history.append(
            {"epoch": epoch + 1, "lr": lr, "loss": loss, **classifier_accuracy(classifier, val_features, val_labels)}
        )
        bar.set_postfix(loss=f"{loss:.4f}", top1=f"{history[-1]['top1']:.2f}")
    return classifier, history


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed},{epoch},probe".encode(), digest_size=8).digest(), "little") >> 1


def cached_batches(
    features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, epoch: int, device="cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An epoch over cached features in a seeded random order: ``(features [B, D], labels [B])``."""
    perm = torch.randperm(len(features), generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))  # [N]
    for lo in range(0, len(perm), batch_size):
        idx = perm[lo : lo + batch_size]  # [B]
        yield features[idx].to(device), labels[idx].to(device)


def augmented_batches(
    backbone: nn.Module, dataset, cfg: ProbeConfig, epoch: int, device="cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An epoch of augmented crops through the frozen backbone: ``(features [B, D], labels [B])``.

    Order and crops are functions of ``(seed, epoch)`` (the DataLoader's generator seeds its workers;
    without workers the crops are drawn under a forked, seeded RNG, so the caller's RNG is untouched).
    """
    seed = _epoch_seed(cfg.seed, epoch)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(seed),
        drop_last=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for x, y, _ in tqdm(
            loader,
            desc=f"epoch {epoch + 1}",
            unit="batch",
            leave=False,
            disable=not cfg.progress or dist_lib.rank() != 0,
        ):
            with torch.no_grad():
                feats = backbone(x.to(device)).to(LINEAR_DTYPE)  # [B, D], eval mode: BN statistics used, not updated
            yield feats, y.to(device)


def training_batches(
    backbone: nn.Module, train, feats: dict, cfg: ProbeConfig, device="cpu"
) -> Callable[[int], Iterable]:
    """``epoch -> batches`` of ``cfg.protocol``'s training data: the cached centre-crop features
    (``feats`` from :func:`scan_zoo.eval.probe_cache.centre_crop_features`) or augmented crops of ``train`` through the frozen backbone."""
    if cfg.protocol == "cached":
        f_train = feats["train_features"].to(device, LINEAR_DTYPE)  # [N, D]
        y_train = feats["train_labels"].to(device)  # [N]
        return lambda epoch: cached_batches(f_train, y_train, cfg.batch_size, cfg.seed, epoch, device)
    augmented = data_lib.EvalImages(train, train_transform(cfg))
    return lambda epoch: augmented_batches(backbone, augmented, cfg, epoch, device)
