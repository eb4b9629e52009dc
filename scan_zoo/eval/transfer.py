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
  (:func:`scan_zoo.eval.multiscale.features_only_model`), extracted once per call and kept in memory as float16.
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
  images (:func:`scan_zoo.core.transfer_metrics.box_iou`).
- **(d) segmentation.** A linear multi-scale head (a linear probe for dense prediction): per level the
  features are standardised per channel (train statistics), a 1x1 conv maps them to 2 class logits,
  which are upsampled bilinearly to the mask size (32 x 32) and summed over levels. Cross-entropy
  against the glyph mask; AdamW lr 1e-2, weight decay 1e-4, batch 128, 5 epochs over the train split
  (``seg_train_images`` caps the images used, default all). On a random-init test_resnet this is
  within 0.5 mIoU of 16 epochs, and about 1.5 s an epoch on one CPU thread (a 32-channel hidden layer
  before the logits cost 16 s an epoch, as its upsampling is 16 times wider). All of timm's default
  feature levels are used (ResNet: stem and the four stages). mIoU is computed over the whole val split
  (one confusion matrix over all pixels, then IoU per class and the mean over the 2 classes, as VOC /
  Cityscapes score it; :func:`scan_zoo.core.transfer_metrics.mean_iou`).
- **Seeds.** Every head's initialisation and data order derive from ``(seed, task)``, under a forked
  RNG (the caller's random state is untouched); the same seed and weights give the same numbers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from scan_zoo.data import datasets as data_lib
from scan_zoo.eval import probe
from scan_zoo.eval.multiscale import extract_multiscale, features_only_model
from scan_zoo.eval.transfer_tasks import (
    TASKS,
    TransferConfig,
    appearance_task,
    box_task,
    digit_targets,
    seg_task,
    semantic_task,
)
from scan_zoo.models.loading import load_backbone

__all__ = ["TASKS", "TransferConfig", "transfer_scores"]


# ----------------------------------------------------------------------------------------------- suite
def transfer_scores(
    model_ref: str,
    data_root: str | Path = "digits",
    seed: int = 0,
    cfg: TransferConfig | None = None,
    *,
    arch: str | None = None,
    device="cpu",
    data_cache: str | None = None,
) -> dict:
    """The four transfer tasks for one frozen backbone on the digit scenes (see the module docstring).

    ``data_root``: a rendered digit-scenes tree (with ``metadata.npz``) or ``"digits"`` (the cached one,
    rendered on first use). Returns ``{"semantic_top1", "appearance_r2", "box_iou", "seg_miou"`` (percent),
    details of each task, ``"seconds"`` per task, ``"settings"``, ``"model"``, ``"weights"``, ...}``.
    """
    cfg = cfg or TransferConfig()
    start = time.perf_counter()
    root = (
        data_lib.resolve_data_root(str(data_root), data_cache, progress=cfg.progress)
        if str(data_root) == "digits"
        else Path(data_root)
    )
    info_file = root / "digits.json"
    size = json.loads(info_file.read_text()).get("size", 32) if info_file.is_file() else 32
    train, val = probe.load_splits(root)
    t_train, t_val = digit_targets(root, train, size), digit_targets(root, val, size)

    backbone, description = load_backbone(model_ref, arch=arch)
    weights = Path(description) if Path(description).is_file() else None
    probe_cfg = probe.ProbeConfig(
        protocol="cached",
        epochs=cfg.probe_epochs,
        milestones=cfg.probe_milestones,
        image_size=size,
        eval_resize=size,
        num_workers=cfg.num_workers,
        extract_batch_size=cfg.extract_batch_size,
        cache_dir=cfg.cache_dir,
        progress=cfg.progress,
        seed=seed,
    )
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
    levels = {
        split: extract_multiscale(
            feature_model,
            data_lib.EvalImages(ds, tf),
            cfg.extract_batch_size,
            cfg.num_workers,
            device,
            cfg.progress,
            f"{split} multi-scale features",
        )
        for split, ds in (("train", train), ("val", val))
    }
    seconds["multiscale_features"] = time.perf_counter() - t
    probe.assert_unchanged(backbone, before)

    out: dict = {}
    t = time.perf_counter()
    out.update(semantic_task(feats, len(train.classes), probe_cfg, seed))
    seconds["semantic"] = time.perf_counter() - t
    t = time.perf_counter()
    out.update(
        appearance_task(
            feats["train_features"],
            t_train["appearance"],
            t_train["glyph"],
            feats["val_features"],
            t_val["appearance"],
            cfg,
            seed,
        )
    )
    seconds["appearance"] = time.perf_counter() - t
    t = time.perf_counter()
    out.update(
        box_task(feats["train_features"], t_train["bbox"], feats["val_features"], t_val["bbox"], size, cfg, seed)
    )
    seconds["localisation"] = time.perf_counter() - t
    t = time.perf_counter()
    out.update(seg_task(levels["train"], t_train["mask"], levels["val"], t_val["mask"], cfg, seed))
    seconds["segmentation"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start
    out.update(
        {
            "seconds": seconds,
            "seed": seed,
            "settings": cfg.to_dict(),
            "model": str(model_ref),
            "weights": description,
            "architecture": backbone.pretrained_cfg.get("architecture"),
            "feature_dim": int(feats["train_features"].shape[1]),
            "train_images": len(train),
            "val_images": len(val),
            "image_size": size,
            "data_root": str(root),
            "feature_cache": {"path": feats["cache_path"], "hit": feats["cache_hit"]},
            "features_only_unused_keys": unused,
        }
    )
    return out
