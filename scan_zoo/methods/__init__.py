"""One small class per method. :func:`build_method` maps a config to one."""
from __future__ import annotations

from torch import nn

from .moco import MoCo
from .scan import SCAN
from .supcon import SupCon
from .supervised import Supervised

__all__ = ["MoCo", "SCAN", "SupCon", "Supervised", "build_method", "num_views"]


def num_views(method: str) -> int:
    return 1 if method == "supervised" else 2


def build_method(cfg, backbone: nn.Module, num_classes: int) -> nn.Module:
    if cfg.method == "supervised":
        return Supervised(backbone, num_classes)
    common = dict(proj_dim=cfg.proj_dim, queue_size=cfg.queue_size, temperature=cfg.temperature,
                  key_momentum=cfg.key_momentum, shuffle_bn=cfg.shuffle_bn, key_bn_splits=cfg.key_bn_splits,
                  seed=cfg.seed)
    if cfg.method == "moco":
        return MoCo(backbone, **common)
    if cfg.method == "supcon":
        return SupCon(backbone, **common)
    if cfg.method == "scan":
        return SCAN(backbone, denominator=cfg.denominator, in_batch_negatives=cfg.in_batch_negatives, **common)
    raise ValueError(f"no method class for {cfg.method!r}")
