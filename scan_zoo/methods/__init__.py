"""One small class per method. :func:`build_method` maps a config to one."""

from __future__ import annotations

from torch import nn

from scan_zoo.methods.dsc import DSC, resolve_feature_layer
from scan_zoo.methods.moco import MoCo
from scan_zoo.methods.scan import SCAN
from scan_zoo.methods.supcon import SupCon
from scan_zoo.methods.supervised import Supervised

__all__ = ["DSC", "MoCo", "SCAN", "SupCon", "Supervised", "build_method", "num_views"]


def num_views(method: str) -> int:
    """Augmented views per image: one for cross-entropy, two (query and key) for the contrastive methods and DSC."""
    return 1 if method == "supervised" else 2


def build_method(cfg, backbone: nn.Module, num_classes: int) -> nn.Module:
    if cfg.method == "supervised":
        return Supervised(backbone, num_classes)
    common = dict(
        proj_dim=cfg.proj_dim,
        queue_size=cfg.queue_size,
        temperature=cfg.temperature,
        key_momentum=cfg.key_momentum,
        shuffle_bn=cfg.shuffle_bn,
        key_bn_splits=cfg.key_bn_splits,
        seed=cfg.seed,
    )
    if cfg.method == "moco":
        return MoCo(backbone, **common)
    if cfg.method == "supcon":
        return SupCon(backbone, **common)
    if cfg.method == "scan":
        return SCAN(backbone, denominator=cfg.denominator, in_batch_negatives=cfg.in_batch_negatives, **common)
    if cfg.method == "dsc":
        return DSC(
            backbone,
            feature_layer=resolve_feature_layer(backbone, cfg.image_size, cfg.dsc_feature_layer),
            dense_dim=cfg.dsc_dense_dim,
            dense_queue_size=cfg.dsc_queue_size,
            topk=cfg.dsc_topk,
            assign=cfg.dsc_assign,
            clusters=cfg.dsc_clusters,
            kmeans_iters=cfg.dsc_kmeans_iters,
            sinkhorn_iters=cfg.dsc_sinkhorn_iters,
            sinkhorn_eps=cfg.dsc_sinkhorn_eps,
            pixel_samples=cfg.dsc_pixel_samples,
            weights=(cfg.dsc_weight_instance, cfg.dsc_weight_pixel, cfg.dsc_weight_category),
            **common,
        )
    raise ValueError(f"no method class for {cfg.method!r}")
