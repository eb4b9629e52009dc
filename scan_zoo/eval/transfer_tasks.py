"""The transfer suite's four tasks: their settings, the digit scenes' targets, the heads and how each is
fitted and scored on frozen features (the choices: :mod:`scan_zoo.eval.transfer`)."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scan_zoo.common.errors import UserError
from scan_zoo.core import metrics as evaluation
from scan_zoo.core.transfer_metrics import box_iou, mean_iou, r2_score, ridge_fit, ridge_select, standardiser
from scan_zoo.data.digits import META_FILE, load_metadata
from scan_zoo.eval import probe

#: (result key, task, metric as shown in tables); every value is in percent
TASKS = (
    ("semantic_top1", "semantic", "top-1 (%)"),
    ("appearance_r2", "appearance", "R^2 x 100"),
    ("box_iou", "localisation", "box IoU (%)"),
    ("seg_miou", "segmentation", "mIoU (%)"),
)
APPEARANCE_FACTORS = (("position", 2), ("scale", 1), ("fg_colour", 3), ("bg_colour", 3))
SEG_CLASSES = ("background", "glyph")


@dataclass
class TransferConfig:
    """Head budgets and settings of :func:`transfer_scores` (defaults: see the module docstring)."""

    probe_epochs: int = 100  # (a) linear probe epochs (MoCo's cached protocol)
    probe_milestones: tuple[int, ...] = (60, 80)  # (a) lr x 0.1 at these epochs
    ridge_alphas: tuple[float, ...] = tuple(float(a) for a in np.logspace(-4, 2, 13))  # (b) lambda = alpha * n
    holdout_fraction: float = 0.2  # (b) share of train glyphs held out to choose lambda
    box_hidden: int = 256  # (c) hidden width of the box MLP
    box_epochs: int = 60  # (c)
    box_lr: float = 1e-3  # (c) AdamW
    box_batch_size: int = 256  # (c)
    seg_epochs: int = 5  # (d)
    seg_lr: float = 1e-2  # (d) AdamW
    seg_batch_size: int = 128  # (d)
    seg_train_images: int | None = None  # (d) use at most this many train images (None: all)
    weight_decay: float = 1e-4  # (c, d) AdamW weight decay
    extract_batch_size: int = 256  # feature extraction
    num_workers: int = 2  # DataLoader workers of feature extraction
    cache_dir: str | None = None  # pooled-feature cache (default: the linear probe's)
    progress: bool = False  # tqdm bars

    @classmethod
    def quick(cls, **kwargs) -> "TransferConfig":
        """Tiny budgets for smoke tests: numbers are not meaningful, only the machinery is exercised."""
        base = dict(
            probe_epochs=5,
            probe_milestones=(3, 4),
            box_epochs=3,
            seg_epochs=1,
            seg_train_images=512,
            ridge_alphas=(1e-2, 1.0),
        )
        return cls(**{**base, **kwargs})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# -------------------------------------------------------------------------------------------- targets
def digit_targets(root: Path, dataset, size: int) -> dict:
    """Metadata rows of ``dataset`` (an ImageFolder of the digit scenes), in the dataset's order.

    Returns ``{"glyph" [N] int64, "appearance" [N, 9] float64, "bbox" [N, 4] float32 (pixels),
    "mask" [N, H, W] int64 (1 = glyph)}``; appearance columns: position x, y (fractions of the canvas),
    scale, fg R, G, B, bg R, G, B (0..255).
    """
    if not (Path(root) / META_FILE).is_file():
        raise UserError(
            f"{root} has no {META_FILE}: the transfer suite needs the digit scenes "
            "(`scan-zoo data digits` or data 'digits')"
        )
    meta = load_metadata(root)
    row_of = {p: i for i, p in enumerate(meta["path"].tolist())}
    rel = [Path(p).relative_to(root).as_posix() for p, _ in dataset.samples]
    missing = [r for r in rel if r not in row_of]
    if missing:
        raise UserError(
            f"{len(missing)} images of {root} are not in its {META_FILE} (e.g. {missing[0]}): render the scenes again"
        )
    rows = np.array([row_of[r] for r in rel])
    if meta["mask"].shape[1:] != (size, size):
        raise UserError(f"masks of {root} are {meta['mask'].shape[1:]}, images are {size} px")
    appearance = np.concatenate(
        [
            meta["position"][rows].astype(np.float64),
            meta["scale"][rows, None].astype(np.float64),
            meta["fg"][rows].astype(np.float64),
            meta["bg"][rows].astype(np.float64),
        ],
        1,
    )
    return {
        "glyph": torch.as_tensor(meta["glyph"][rows]).long(),
        "label": torch.as_tensor(meta["label"][rows]).long(),
        "appearance": torch.as_tensor(appearance),  # [N, 9]
        "bbox": torch.as_tensor(meta["bbox"][rows].astype(np.float32)),  # [N, 4]
        "mask": torch.as_tensor(meta["mask"][rows]).long(),
    }  # [N, H, W]


# ---------------------------------------------------------------------------------------------- heads
class BoxHead(nn.Module):
    """``Linear(D, hidden) -> ReLU -> Linear(hidden, 4)`` on standardised pooled features."""

    def __init__(self, dim: int, hidden: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1((x - self.mean) / self.std)))  # [B, 4] box / canvas side


class SegHead(nn.Module):
    """Per level: standardise channels, 1x1 conv to class logits, upsample bilinearly to ``size``; sum.

    Linear in the features (a linear probe for dense prediction): the score measures what the frozen
    multi-scale features make linearly decodable, as the pooled linear probe does for classes.
    """

    def __init__(
        self,
        channels: Sequence[int],
        stats: Sequence[tuple[torch.Tensor, torch.Tensor]],
        size: int,
        num_classes: int = 2,
    ):
        super().__init__()
        self.size = size
        self.lateral = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in channels)
        for i, (m, s) in enumerate(stats):
            self.register_buffer(f"mean{i}", m.float()[None, :, None, None])
            self.register_buffer(f"std{i}", s.float()[None, :, None, None])

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = 0
        for i, (conv, f) in enumerate(zip(self.lateral, feats)):
            f = (f.float() - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")
            x = x + F.interpolate(conv(f), size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x  # [B, classes, size, size]


def _task_seed(seed: int, task: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed},{task},transfer".encode(), digest_size=8).digest(), "little") >> 1


def _fit(
    head: nn.Module, n: int, step, epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int
) -> float:
    """AdamW over ``epochs`` seeded shuffles of ``range(n)``; ``step(idx)`` returns the batch loss. Last epoch's mean loss."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    head.train()
    loss_sum = 0.0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        loss_sum, seen = 0.0, 0
        for lo in range(0, n, batch_size):
            idx = perm[lo : lo + batch_size]
            loss = step(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum, seen = loss_sum + loss.item() * len(idx), seen + len(idx)
        loss_sum /= max(seen, 1)
    head.eval()
    return loss_sum


# ---------------------------------------------------------------------------------------------- tasks
def semantic_task(feats: dict, num_classes: int, probe_cfg, seed: int) -> dict:
    """(a) The cached linear protocol (:func:`scan_zoo.eval.probe.fit_linear`) and kNN on the pooled features.

    The layer is float32, as when results/transfer_digits.json was measured (eval_linear.py's cached probe
    trains it in float64, bit-stable across thread counts; re-measure the table before switching)."""
    cfg = dataclasses.replace(probe_cfg, seed=seed)
    f_train, y_train = feats["train_features"], feats["train_labels"]

    def epochs(epoch):
        return probe.cached_batches(f_train, y_train, cfg.batch_size, cfg.seed, epoch)

    _, history = probe.fit_linear(
        epochs, f_train.shape[1], num_classes, feats["val_features"], feats["val_labels"], cfg, dtype=torch.float32
    )
    knn = evaluation.topk_accuracy(
        evaluation.knn_classify(f_train, y_train, feats["val_features"], num_classes, cfg.knn_k, cfg.knn_temperature),
        feats["val_labels"],
    )
    return {
        "semantic_top1": history[-1]["top1"],
        "semantic_top5": history[-1]["top5"],
        "semantic_knn_top1": knn["top1"],
        "probe": probe.protocol_settings(cfg),
    }


def appearance_task(
    f_train: torch.Tensor,
    y_train: torch.Tensor,
    glyph_train: torch.Tensor,
    f_val: torch.Tensor,
    y_val: torch.Tensor,
    cfg: TransferConfig,
    seed: int,
) -> dict:
    """(b) Ridge regression of the 9 appearance targets; lambda chosen on held-out train glyphs."""
    glyphs = torch.unique(glyph_train)
    g = torch.Generator().manual_seed(_task_seed(seed, "appearance"))
    held = glyphs[torch.randperm(len(glyphs), generator=g)[: max(1, int(round(cfg.holdout_fraction * len(glyphs))))]]
    hold = torch.isin(glyph_train, held)  # [N] bool

    def standardise(x_fit, *others):
        m, s = standardiser(x_fit.double())
        return [(x.double() - m) / s for x in (x_fit, *others)]

    xf, xh = standardise(f_train[~hold], f_train[hold])
    yf, yh = standardise(y_train[~hold], y_train[hold])
    alpha, scores = ridge_select(xf, yf, xh, yh, cfg.ridge_alphas)
    x_all, x_val = standardise(f_train, f_val)
    y_all, y_val_s = standardise(y_train, y_val)
    ((w, b),) = ridge_fit(x_all, y_all, [alpha * len(x_all)])
    r2 = r2_score(x_val @ w + b, y_val_s)  # [9]; invariant to the targets' standardisation
    by_factor, col = {}, 0
    for name, width in APPEARANCE_FACTORS:
        by_factor[name] = 100.0 * r2[col : col + width].mean().item()
        col += width
    return {
        "appearance_r2": 100.0 * r2.mean().item(),
        "appearance_r2_by_factor": by_factor,
        "appearance_r2_per_target": [100.0 * v for v in r2.tolist()],
        "appearance_alpha": alpha,
        "appearance_lambda": alpha * len(x_all),
        "appearance_holdout_r2": dict(zip([f"{a:g}" for a in cfg.ridge_alphas], [100.0 * s for s in scores])),
    }


def box_task(
    f_train: torch.Tensor,
    box_train: torch.Tensor,
    f_val: torch.Tensor,
    box_val: torch.Tensor,
    size: int,
    cfg: TransferConfig,
    seed: int,
) -> dict:
    """(c) 2-layer MLP from pooled features to the glyph box; mean IoU on val."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_task_seed(seed, "box"))
        mean, std = standardiser(f_train.float())
        head = BoxHead(f_train.shape[1], cfg.box_hidden, mean, std)
    x, target = f_train.float(), box_train.float() / size  # [N, D], [N, 4] in [0, 1]

    def step(idx):
        return F.l1_loss(head(x[idx]), target[idx])

    loss = _fit(
        head,
        len(x),
        step,
        cfg.box_epochs,
        cfg.box_batch_size,
        cfg.box_lr,
        cfg.weight_decay,
        _task_seed(seed, "box-order"),
    )
    with torch.no_grad():
        p = head(f_val.float()).double() * size  # [M, 4] pixels
    xs, _ = torch.sort(p[:, [0, 2]], dim=1)
    ys, _ = torch.sort(p[:, [1, 3]], dim=1)
    pred = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1).clamp(0, size)
    iou = box_iou(pred, box_val)
    return {"box_iou": 100.0 * iou.mean().item(), "box_train_l1": loss}


def seg_task(
    train_levels: list[torch.Tensor],
    mask_train: torch.Tensor,
    val_levels: list[torch.Tensor],
    mask_val: torch.Tensor,
    cfg: TransferConfig,
    seed: int,
) -> dict:
    """(d) Linear multi-scale head, cross-entropy against the glyph mask; dataset-level mIoU on val."""
    n = len(mask_train)
    if cfg.seg_train_images is not None and cfg.seg_train_images < n:
        g = torch.Generator().manual_seed(_task_seed(seed, "seg-subset"))
        keep = torch.randperm(n, generator=g)[: cfg.seg_train_images].sort().values
        train_levels, mask_train, n = [f[keep] for f in train_levels], mask_train[keep], len(keep)
    size = mask_train.shape[-1]
    stats = []
    for f in train_levels:
        flat = f.float().transpose(0, 1).reshape(f.shape[1], -1)  # [C, N H W]
        m, s = flat.mean(1), flat.std(1, unbiased=False)
        stats.append((m, torch.where(s > 1e-6, s, torch.ones_like(s))))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_task_seed(seed, "seg"))
        head = SegHead([f.shape[1] for f in train_levels], stats, size)

    def step(idx):
        return F.cross_entropy(head([f[idx] for f in train_levels]), mask_train[idx])

    loss = _fit(
        head, n, step, cfg.seg_epochs, cfg.seg_batch_size, cfg.seg_lr, cfg.weight_decay, _task_seed(seed, "seg-order")
    )
    preds = []
    with torch.no_grad():
        for lo in range(0, len(mask_val), 256):
            preds.append(head([f[lo : lo + 256] for f in val_levels]).argmax(1))  # [b, H, W]
    miou, per_class = mean_iou(torch.cat(preds), mask_val, len(SEG_CLASSES))
    return {
        "seg_miou": 100.0 * miou,
        "seg_iou_by_class": dict(zip(SEG_CLASSES, [100.0 * v for v in per_class])),
        "seg_train_ce": loss,
        "seg_levels": [list(f.shape[1:]) for f in train_levels],
    }
