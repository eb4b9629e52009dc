"""Multi-scale features of a frozen backbone: timm's ``features_only`` form carrying the backbone's own
weights (loaded strictly), and one extraction pass over a data set (the transfer suite's segmentation task)."""

from __future__ import annotations

import logging
from typing import Sequence

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from scan_zoo.common.errors import UserError
from scan_zoo.models.backbones import load_strict

logger = logging.getLogger(__name__)


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
        src = key if key in backbone_state else key[len("model.") :] if key.startswith("model.") else None
        if src is None or src not in backbone_state:
            missing.append(key)
            continue
        state[key] = backbone_state[src]
    if missing:
        raise UserError(
            f"features_only model keys not found in the backbone: {missing[:8]}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        )
    used = {k if k in backbone_state else k[len("model.") :] for k in feature_keys}
    return state, sorted(set(backbone_state) - used)


def features_only_model(backbone: nn.Module) -> tuple[nn.Module, list[str]]:
    """``timm.create_model(arch, features_only=True)`` with ``backbone``'s weights, loaded strictly (every key
    of the features_only model from the backbone, shapes checked). Returns ``(model in eval mode, backbone
    keys it does not use)``."""

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
def extract_multiscale(
    model: nn.Module,
    dataset,
    batch_size: int = 256,
    num_workers: int = 2,
    device="cpu",
    progress: bool = False,
    desc: str = "multi-scale features",
) -> list[torch.Tensor]:
    """Every level of a features_only model for every image: ``[float16 [N, C_l, H_l, W_l]]``."""
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
