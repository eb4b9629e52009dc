"""The transfer suite on the digit scenes: the SCAN paper's Table 1 in miniature.

One frozen backbone (anything :func:`scan_zoo.models.loading.load_backbone` accepts), four downstream tasks, each
a small head trained on frozen features of the train split and scored on the val split. The digit
scenes' ``metadata.npz`` (:mod:`scan_zoo.data.digits`) gives every target; images are read under the
evaluation transform of ``eval_linear.py`` (:func:`scan_zoo.eval.probe.resolve_config`: the model's mean/std,
resize and centre crop both equal to the canvas side, i.e. the whole 32-px image untouched), so pixel
coordinates of boxes and masks are those of the rendered canvas.

Reported numbers (all in percent, as the paper's Table 1):

=================  ============  ======================================================================
key                task          metric
=================  ============  ======================================================================
``semantic_top1``  semantic      class top-1 of a linear probe (val)
``appearance_r2``  appearance    R^2 x 100 (variance explained), averaged over 9 standardised targets
``box_iou``        localisation  mean IoU x 100 of predicted vs true glyph boxes (val images)
``seg_miou``       segmentation  mIoU x 100 over {background, glyph} at 32 x 32 (val pixels)
=================  ============  ======================================================================

Choices, task by task:

- **Features.** Pooled features (a, b, c) are the centre-crop features of the fast linear probe,
  extracted once and cached on disk by :func:`scan_zoo.eval.probe.centre_crop_features` (reused, so
  ``eval_linear.py`` and this suite share one cache). Multi-scale features (d) come from
  ``timm.create_model(arch, features_only=True)`` carrying the backbone's own weights, loaded strictly
  (:func:`features_only_model`), extracted once per call and kept in memory as float16.
  The backbone is frozen, in eval mode (BN running statistics), and checked bit for bit afterwards
  (:func:`scan_zoo.eval.probe.assert_unchanged`).
- **(a) semantic.** The cached linear protocol of ``eval_linear.py`` unchanged (MoCo's main_lincls.py
  settings: linear layer N(0, 0.01) on raw pooled features, SGD lr 30, momentum 0.9, wd 0, batch 256,
  lr x0.1 at epochs 60 and 80 of 100, last epoch reported), trained by :func:`scan_zoo.eval.probe.fit_linear`.
  On cached features the full 100 epochs take about a second, so the schedule is not shortened;
  :meth:`TransferConfig.quick` shortens it to 5 epochs (milestones 3, 4) for smoke tests.
  kNN top-1 (k 20, T 0.07) is reported beside it (``semantic_knn_top1``).
- **(b) appearance.** Nine targets: glyph position (centre x, y; 2), scale (1), foreground RGB (3) and
  background RGB (3). Features and targets are standardised with the statistics of the fitting rows.
  Closed-form ridge regression ``W = (X'X + lambda I)^-1 X'Y`` on centred data (the intercept is not
  penalised), one lambda shared by all targets: ``lambda = alpha * n`` with ``alpha`` from
  ``ridge_alphas`` (10^-4 .. 10^2, 13 values; ``n`` rows, so alpha is on the scale of the standardised
  features' Gram diagonal), chosen by the mean R^2 on a held-out 20 % of the train split, split by
  *glyph* (the renders of one handwritten glyph are all fitted or all held out, so a lambda is never
  chosen on near-duplicates). The model is then refitted on the whole train split with that lambda.
  R^2 per target is ``1 - SS_res / SS_tot`` on the val split (SS_tot about the val mean, as
  scikit-learn's ``r2_score``); it can be negative. The headline is the uniform mean over the 9
  targets; per-factor means are kept in ``appearance_r2_by_factor``.
- **(c) localisation.** A 2-layer MLP (``D -> 256 -> 4``, ReLU) on the standardised pooled features
  regresses the glyph box ``(x0, y0, x1, y1)`` divided by the canvas side (exclusive ends, as in the
  metadata), with the L1 loss; AdamW lr 1e-3, weight decay 1e-4, batch 256, 60 epochs. Predicted
  coordinates are sorted per axis (so x0 <= x1) and clipped to the canvas before scoring.
  IoU of boxes with exclusive ends: area = (x1 - x0) (y1 - y0); the headline is the mean IoU over val
  images (:func:`box_iou`).
- **(d) segmentation.** A linear multi-scale head (a linear probe for dense prediction): per level the
  features are standardised per channel (train statistics), a 1x1 conv maps them to 2 class logits,
  which are upsampled bilinearly to the mask size (32 x 32) and summed over levels. Cross-entropy
  against the glyph mask; AdamW lr 1e-2, weight decay 1e-4, batch 128, 5 epochs over the train split
  (``seg_train_images`` caps the images used, default all). On a random-init test_resnet this is
  within 0.5 mIoU of 16 epochs, and about 1.5 s an epoch on one CPU thread (a 32-channel hidden layer
  before the logits cost 16 s an epoch, as its upsampling is 16 times wider). All of timm's default
  feature levels are used (ResNet: stem and the four stages). mIoU is computed over the whole val split
  (one confusion matrix over all pixels, then IoU per class and the mean over the 2 classes, as VOC /
  Cityscapes score it; :func:`mean_iou`).
- **Seeds.** Every head's initialisation and data order derive from ``(seed, task)``, under a forked
  RNG (the caller's random state is untouched); the same seed and weights give the same numbers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scan_zoo.common.errors import UserError

logger = logging.getLogger(__name__)

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
    seg_train_images: Optional[int] = None  # (d) use at most this many train images (None: all)
    weight_decay: float = 1e-4  # (c, d) AdamW weight decay
    extract_batch_size: int = 256  # feature extraction
    num_workers: int = 2  # DataLoader workers of feature extraction
    cache_dir: Optional[str] = None  # pooled-feature cache (default: the linear probe's)
    progress: bool = False  # tqdm bars

    @classmethod
    def quick(cls, **kwargs) -> "TransferConfig":
        """Tiny budgets for smoke tests: numbers are not meaningful, only the machinery is exercised."""
        base = dict(probe_epochs=5, probe_milestones=(3, 4), box_epochs=3, seg_epochs=1, seg_train_images=512,
                    ridge_alphas=(1e-2, 1.0))
        return cls(**{**base, **kwargs})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# ------------------------------------------------------------------------------------------- metrics
def box_iou(pred, target) -> torch.Tensor:
    """IoU of matching boxes ``[N, 4]`` ``(x0, y0, x1, y1)`` with exclusive ends: ``[N]`` in [0, 1].

    Area is ``(x1 - x0) * (y1 - y0)`` (negative extents count as 0). Two empty boxes have IoU 0.
    """
    p = torch.as_tensor(pred, dtype=torch.float64)
    t = torch.as_tensor(target, dtype=torch.float64)
    assert p.shape == t.shape and p.shape[-1] == 4, "boxes are [N, 4] (x0, y0, x1, y1), one prediction per target"
    iw = (torch.minimum(p[:, 2], t[:, 2]) - torch.maximum(p[:, 0], t[:, 0])).clamp(min=0)  # [N]
    ih = (torch.minimum(p[:, 3], t[:, 3]) - torch.maximum(p[:, 1], t[:, 1])).clamp(min=0)
    inter = iw * ih
    area_p = (p[:, 2] - p[:, 0]).clamp(min=0) * (p[:, 3] - p[:, 1]).clamp(min=0)
    area_t = (t[:, 2] - t[:, 0]).clamp(min=0) * (t[:, 3] - t[:, 1]).clamp(min=0)
    union = area_p + area_t - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def confusion_matrix(pred, target, num_classes: int) -> torch.Tensor:
    """``[C, C]`` int64 counts, rows = true class, columns = predicted class, over every element."""
    p = torch.as_tensor(pred).long().reshape(-1)
    t = torch.as_tensor(target).long().reshape(-1)
    assert p.shape == t.shape, "one prediction per target pixel"
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def mean_iou(pred, target, num_classes: int = 2) -> tuple[float, list[float]]:
    """Dataset-level mIoU: ``(mean over classes, [IoU per class])`` from one confusion matrix over all pixels.

    IoU of class c = TP / (TP + FP + FN). A class absent from both prediction and target (union 0) is
    NaN and left out of the mean.
    """
    cm = confusion_matrix(pred, target, num_classes).double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp  # [C] predicted + true - both
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    present = ~torch.isnan(iou)
    miou = iou[present].mean().item() if present.any() else float("nan")
    return miou, iou.tolist()


def r2_score(pred, target) -> torch.Tensor:
    """Coefficient of determination per target column: ``1 - SS_res / SS_tot`` (``[T]``; NaN where the
    target is constant). Same definition as scikit-learn's ``r2_score(..., multioutput='raw_values')``."""
    p = torch.as_tensor(pred, dtype=torch.float64)
    t = torch.as_tensor(target, dtype=torch.float64)
    if t.ndim == 1:
        p, t = p[:, None], t[:, None]
    assert p.shape == t.shape, "one prediction per target"
    ss_res = ((t - p) ** 2).sum(0)
    ss_tot = ((t - t.mean(0)) ** 2).sum(0)
    return torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp(min=1e-300), torch.full_like(ss_tot, float("nan")))


# --------------------------------------------------------------------------------------------- ridge
def standardiser(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [D], std [D])`` of the rows of ``x``; constant columns get std 1 (they stay 0 after centring)."""
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return mean, torch.where(std > eps, std, torch.ones_like(std))


def ridge_fit(x: torch.Tensor, y: torch.Tensor, lambdas: Sequence[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Closed-form ridge for several lambdas: ``[(W [D, T], b [T])]`` minimising
    ``|y - x W - b|^2 + lambda |W|^2`` (intercept unpenalised). One eigendecomposition of the centred
    Gram matrix serves every lambda."""
    x = x.double()
    y = y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    evals, evecs = torch.linalg.eigh(xc.T @ xc)  # [D], [D, D]
    proj = evecs.T @ (xc.T @ yc)  # [D, T]
    out = []
    for lam in lambdas:
        w = evecs @ (proj / (evals.clamp(min=0) + lam)[:, None])  # [D, T]
        out.append((w, my - mx @ w))
    return out


def ridge_select(x_fit: torch.Tensor, y_fit: torch.Tensor, x_hold: torch.Tensor, y_hold: torch.Tensor,
                 alphas: Sequence[float]) -> tuple[float, list[float]]:
    """``(best alpha, mean held-out R^2 per alpha)``, lambda = alpha * rows of ``x_fit``."""
    fits = ridge_fit(x_fit, y_fit, [a * len(x_fit) for a in alphas])
    scores = [float(torch.nan_to_num(r2_score(x_hold.double() @ w + b, y_hold), nan=0.0).mean()) for w, b in fits]
    return float(alphas[int(np.argmax(scores))]), scores


# -------------------------------------------------------------------------------------------- targets
def digit_targets(root: Path, dataset, size: int) -> dict:
    """Metadata rows of ``dataset`` (an ImageFolder of the digit scenes), in the dataset's order.

    Returns ``{"glyph" [N] int64, "appearance" [N, 9] float64, "bbox" [N, 4] float32 (pixels),
    "mask" [N, H, W] int64 (1 = glyph)}``; appearance columns: position x, y (fractions of the canvas),
    scale, fg R, G, B, bg R, G, B (0..255).
    """
    from scan_zoo.data.digits import META_FILE, load_metadata

    if not (Path(root) / META_FILE).is_file():
        raise UserError(f"{root} has no {META_FILE}: the transfer suite needs the digit scenes "
                        "(`scan-zoo data digits` or data 'digits')")
    meta = load_metadata(root)
    row_of = {p: i for i, p in enumerate(meta["path"].tolist())}
    rel = [Path(p).relative_to(root).as_posix() for p, _ in dataset.samples]
    missing = [r for r in rel if r not in row_of]
    if missing:
        raise UserError(f"{len(missing)} images of {root} are not in its {META_FILE} (e.g. {missing[0]}): "
                        "render the scenes again")
    rows = np.array([row_of[r] for r in rel])
    if meta["mask"].shape[1:] != (size, size):
        raise UserError(f"masks of {root} are {meta['mask'].shape[1:]}, images are {size} px")
    appearance = np.concatenate([meta["position"][rows].astype(np.float64), meta["scale"][rows, None].astype(np.float64),
                                 meta["fg"][rows].astype(np.float64), meta["bg"][rows].astype(np.float64)], 1)
    return {"glyph": torch.as_tensor(meta["glyph"][rows]).long(),
            "label": torch.as_tensor(meta["label"][rows]).long(),
            "appearance": torch.as_tensor(appearance),  # [N, 9]
            "bbox": torch.as_tensor(meta["bbox"][rows].astype(np.float32)),  # [N, 4]
            "mask": torch.as_tensor(meta["mask"][rows]).long()}  # [N, H, W]


# -------------------------------------------------------------------------------------- features_only
def feature_state_dict(backbone_state: dict, feature_keys: Sequence[str]) -> tuple[dict, list[str]]:
    """The backbone's tensors under a ``features_only`` model's key names: ``(state, unused backbone keys)``.

    timm wraps the *same* modules: FeatureListNet / FeatureDictNet keep the model's module names and drop
    the modules after the last feature level (ResNet: ``global_pool`` and ``fc``, which hold no weights at
    ``num_classes=0``, so the keys are identical); FeatureGetterNet nests the model under ``model.``.
    Any other renaming (``flatten_sequential``) is refused, naming the keys that cannot be found.
    """
    state, missing = {}, []
    for key in feature_keys:
        src = key if key in backbone_state else key[len("model."):] if key.startswith("model.") else None
        if src is None or src not in backbone_state:
            missing.append(key)
            continue
        state[key] = backbone_state[src]
    if missing:
        raise UserError(f"features_only model keys not found in the backbone: {missing[:8]}"
                        + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    used = {k if k in backbone_state else k[len("model."):] for k in feature_keys}
    return state, sorted(set(backbone_state) - used)


def features_only_model(backbone: nn.Module) -> tuple[nn.Module, list[str]]:
    """``timm.create_model(arch, features_only=True)`` with ``backbone``'s weights, loaded strictly (every key
    of the features_only model from the backbone, shapes checked). Returns ``(model in eval mode, backbone
    keys it does not use)``."""
    import timm

    from scan_zoo.models.backbones import load_strict

    arch = backbone.pretrained_cfg.get("architecture")
    try:
        model = timm.create_model(arch, features_only=True, pretrained=False)
    except (RuntimeError, AttributeError) as e:
        raise UserError(f"{arch} has no features_only form in timm ({e}): the segmentation task needs one") from None
    state, unused = feature_state_dict(backbone.state_dict(), list(model.state_dict()))
    load_strict(model, state, f"the {arch} backbone")
    if unused:
        logger.info("features_only %s leaves %d backbone tensors unused: %s", arch, len(unused), unused[:5])
    return model.eval(), unused


@torch.no_grad()
def extract_multiscale(model: nn.Module, dataset, batch_size: int = 256, num_workers: int = 2,
                       device="cpu", progress: bool = False, desc: str = "multi-scale features") -> list[torch.Tensor]:
    """Every level of a features_only model for every image: ``[float16 [N, C_l, H_l, W_l]]``."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    model.eval()
    levels: list[list[torch.Tensor]] = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for x, _, _ in tqdm(loader, desc=desc, disable=not progress, unit="batch", leave=False):
        outs = model(x.to(device))  # list of [b, C_l, H_l, W_l]
        if not levels:
            levels = [[] for _ in outs]
        for store, f in zip(levels, outs):
            half = f.float().cpu().half()
            if not torch.isfinite(half).all():
                raise UserError(f"{desc}: non-finite values (NaN in the backbone, or beyond float16's range)")
            store.append(half)
    return [torch.cat(s) for s in levels]


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

    def __init__(self, channels: Sequence[int], stats: Sequence[tuple[torch.Tensor, torch.Tensor]], size: int,
                 num_classes: int = 2):
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


def _fit(head: nn.Module, n: int, step, epochs: int, batch_size: int, lr: float, weight_decay: float,
         seed: int) -> float:
    """AdamW over ``epochs`` seeded shuffles of ``range(n)``; ``step(idx)`` returns the batch loss. Last epoch's mean loss."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    head.train()
    loss_sum = 0.0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        loss_sum, seen = 0.0, 0
        for lo in range(0, n, batch_size):
            idx = perm[lo:lo + batch_size]
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
    """(a) The cached linear protocol (:func:`scan_zoo.eval.probe.fit_linear`) and kNN on the pooled features."""
    from scan_zoo.core import metrics as evaluation
    from scan_zoo.eval import probe
    cfg = dataclasses.replace(probe_cfg, seed=seed)
    f_train, y_train = feats["train_features"], feats["train_labels"]

    def epochs(epoch):
        return probe.cached_batches(f_train, y_train, cfg.batch_size, cfg.seed, epoch)

    _, history = probe.fit_linear(epochs, f_train.shape[1], num_classes, feats["val_features"], feats["val_labels"], cfg)
    knn = evaluation.topk_accuracy(evaluation.knn_classify(f_train, y_train, feats["val_features"], num_classes,
                                                           cfg.knn_k, cfg.knn_temperature), feats["val_labels"])
    return {"semantic_top1": history[-1]["top1"], "semantic_top5": history[-1]["top5"],
            "semantic_knn_top1": knn["top1"], "probe": probe.protocol_settings(cfg)}


def appearance_task(f_train: torch.Tensor, y_train: torch.Tensor, glyph_train: torch.Tensor, f_val: torch.Tensor,
                    y_val: torch.Tensor, cfg: TransferConfig, seed: int) -> dict:
    """(b) Ridge regression of the 9 appearance targets; lambda chosen on held-out train glyphs."""
    glyphs = torch.unique(glyph_train)
    g = torch.Generator().manual_seed(_task_seed(seed, "appearance"))
    held = glyphs[torch.randperm(len(glyphs), generator=g)[:max(1, int(round(cfg.holdout_fraction * len(glyphs))))]]
    hold = torch.isin(glyph_train, held)  # [N] bool

    def standardise(x_fit, *others):
        m, s = standardiser(x_fit.double())
        return [(x.double() - m) / s for x in (x_fit, *others)]

    xf, xh = standardise(f_train[~hold], f_train[hold])
    yf, yh = standardise(y_train[~hold], y_train[hold])
    alpha, scores = ridge_select(xf, yf, xh, yh, cfg.ridge_alphas)
    x_all, x_val = standardise(f_train, f_val)
    y_all, y_val_s = standardise(y_train, y_val)
    (w, b), = ridge_fit(x_all, y_all, [alpha * len(x_all)])
    r2 = r2_score(x_val @ w + b, y_val_s)  # [9]; invariant to the targets' standardisation
    by_factor, col = {}, 0
    for name, width in APPEARANCE_FACTORS:
        by_factor[name] = 100.0 * r2[col:col + width].mean().item()
        col += width
    return {"appearance_r2": 100.0 * r2.mean().item(), "appearance_r2_by_factor": by_factor,
            "appearance_r2_per_target": [100.0 * v for v in r2.tolist()], "appearance_alpha": alpha,
            "appearance_lambda": alpha * len(x_all),
            "appearance_holdout_r2": dict(zip([f"{a:g}" for a in cfg.ridge_alphas], [100.0 * s for s in scores]))}


def box_task(f_train: torch.Tensor, box_train: torch.Tensor, f_val: torch.Tensor, box_val: torch.Tensor,
             size: int, cfg: TransferConfig, seed: int) -> dict:
    """(c) 2-layer MLP from pooled features to the glyph box; mean IoU on val."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_task_seed(seed, "box"))
        mean, std = standardiser(f_train.float())
        head = BoxHead(f_train.shape[1], cfg.box_hidden, mean, std)
    x, target = f_train.float(), box_train.float() / size  # [N, D], [N, 4] in [0, 1]

    def step(idx):
        return F.l1_loss(head(x[idx]), target[idx])

    loss = _fit(head, len(x), step, cfg.box_epochs, cfg.box_batch_size, cfg.box_lr, cfg.weight_decay,
                _task_seed(seed, "box-order"))
    with torch.no_grad():
        p = head(f_val.float()).double() * size  # [M, 4] pixels
    xs, _ = torch.sort(p[:, [0, 2]], dim=1)
    ys, _ = torch.sort(p[:, [1, 3]], dim=1)
    pred = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1).clamp(0, size)
    iou = box_iou(pred, box_val)
    return {"box_iou": 100.0 * iou.mean().item(), "box_train_l1": loss}


def seg_task(train_levels: list[torch.Tensor], mask_train: torch.Tensor, val_levels: list[torch.Tensor],
             mask_val: torch.Tensor, cfg: TransferConfig, seed: int) -> dict:
    """(d) Linear multi-scale head, cross-entropy against the glyph mask; dataset-level mIoU on val."""
    n = len(mask_train)
    if cfg.seg_train_images is not None and cfg.seg_train_images < n:
        g = torch.Generator().manual_seed(_task_seed(seed, "seg-subset"))
        keep = torch.randperm(n, generator=g)[:cfg.seg_train_images].sort().values
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

    loss = _fit(head, n, step, cfg.seg_epochs, cfg.seg_batch_size, cfg.seg_lr, cfg.weight_decay,
                _task_seed(seed, "seg-order"))
    preds = []
    with torch.no_grad():
        for lo in range(0, len(mask_val), 256):
            preds.append(head([f[lo:lo + 256] for f in val_levels]).argmax(1))  # [b, H, W]
    miou, per_class = mean_iou(torch.cat(preds), mask_val, len(SEG_CLASSES))
    return {"seg_miou": 100.0 * miou, "seg_iou_by_class": dict(zip(SEG_CLASSES, [100.0 * v for v in per_class])),
            "seg_train_ce": loss, "seg_levels": [list(f.shape[1:]) for f in train_levels]}


# ----------------------------------------------------------------------------------------------- suite
def transfer_scores(model_ref: str, data_root: str | Path = "digits", seed: int = 0,
                    cfg: Optional[TransferConfig] = None, *, arch: Optional[str] = None, device="cpu",
                    data_cache: Optional[str] = None) -> dict:
    """The four transfer tasks for one frozen backbone on the digit scenes (see the module docstring).

    ``data_root``: a rendered digit-scenes tree (with ``metadata.npz``) or ``"digits"`` (the cached one,
    rendered on first use). Returns ``{"semantic_top1", "appearance_r2", "box_iou", "seg_miou"`` (percent),
    details of each task, ``"seconds"`` per task, ``"settings"``, ``"model"``, ``"weights"``, ...}``.
    """
    from scan_zoo.data import datasets as data_lib
    from scan_zoo.eval import probe
    from scan_zoo.models.loading import load_backbone

    cfg = cfg or TransferConfig()
    start = time.perf_counter()
    root = data_lib.resolve_data_root(str(data_root), data_cache, progress=cfg.progress) \
        if str(data_root) == "digits" else Path(data_root)
    info_file = root / "digits.json"
    size = json.loads(info_file.read_text()).get("size", 32) if info_file.is_file() else 32
    train, val = probe.load_splits(root)
    t_train, t_val = digit_targets(root, train, size), digit_targets(root, val, size)

    backbone, description = load_backbone(model_ref, arch=arch)
    weights = Path(description) if Path(description).is_file() else None
    probe_cfg = probe.ProbeConfig(protocol="cached", epochs=cfg.probe_epochs, milestones=cfg.probe_milestones,
                                  image_size=size, eval_resize=size, num_workers=cfg.num_workers,
                                  extract_batch_size=cfg.extract_batch_size, cache_dir=cfg.cache_dir,
                                  progress=cfg.progress, seed=seed)
    probe_cfg = probe.resolve_config(probe_cfg, probe.model_preprocessing(backbone, weights), "digits")
    backbone = backbone.to(device).eval()
    before = probe.snapshot(backbone)
    backbone.requires_grad_(False)
    seconds = {}

    t = time.perf_counter()
    feats = probe.centre_crop_features(backbone, train, val, probe_cfg, device)
    seconds["pooled_features"] = time.perf_counter() - t
    t = time.perf_counter()
    feature_model, unused = features_only_model(backbone)
    feature_model = feature_model.to(device)
    tf = probe.eval_transform(probe_cfg)
    levels = {split: extract_multiscale(feature_model, data_lib.EvalImages(ds, tf), cfg.extract_batch_size,
                                        cfg.num_workers, device, cfg.progress, f"{split} multi-scale features")
              for split, ds in (("train", train), ("val", val))}
    seconds["multiscale_features"] = time.perf_counter() - t
    probe.assert_unchanged(backbone, before)

    out: dict = {}
    t = time.perf_counter()
    out.update(semantic_task(feats, len(train.classes), probe_cfg, seed))
    seconds["semantic"] = time.perf_counter() - t
    t = time.perf_counter()
    out.update(appearance_task(feats["train_features"], t_train["appearance"], t_train["glyph"], feats["val_features"],
                               t_val["appearance"], cfg, seed))
    seconds["appearance"] = time.perf_counter() - t
    t = time.perf_counter()
    out.update(box_task(feats["train_features"], t_train["bbox"], feats["val_features"], t_val["bbox"], size, cfg, seed))
    seconds["localisation"] = time.perf_counter() - t
    t = time.perf_counter()
    out.update(seg_task(levels["train"], t_train["mask"], levels["val"], t_val["mask"], cfg, seed))
    seconds["segmentation"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start
    out.update({"seconds": seconds, "seed": seed, "settings": cfg.to_dict(), "model": str(model_ref),
                "weights": description, "architecture": backbone.pretrained_cfg.get("architecture"),
                "feature_dim": int(feats["train_features"].shape[1]), "train_images": len(train),
                "val_images": len(val), "image_size": size, "data_root": str(root),
                "feature_cache": {"path": feats["cache_path"], "hit": feats["cache_hit"]},
                "features_only_unused_keys": unused})
    return out
