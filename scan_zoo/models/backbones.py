"""Backbones: build any timm architecture headless, load label-free weights strictly, export plain timm weights."""

from __future__ import annotations

import logging
from pathlib import Path

import timm
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors.torch import save_file
from timm.layers import PatchEmbed
from timm.models._hub import save_config_for_hf
from torch import nn

from scan_zoo.common.errors import UserError

_logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
HEAD_NAME = "head.safetensors"
CONFIG_NAME = "config.json"


def create_backbone(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(name, num_classes=0)``: pooled features ``[B, num_features]``."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid pretrained tag" in str(e):
            raise UserError(f"unknown backbone {name!r}: not a timm model name (see timm.list_models())") from None
        if "Error(s) in loading state_dict" in str(e):
            raise UserError(
                f"the weights of {name!r} do not fit its architecture: {' '.join(str(e).split())[:400]}"
            ) from None
        raise
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:  # no network, no such repository or file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot fetch the weights of {name!r}: {first}") from None


def pooled_dim(backbone: nn.Module) -> int:
    """Width of the headless model's output. Models that keep a conv head with ``num_classes=0``
    (MobileNetV3, GhostNet, ...) output ``head_hidden_size`` features, not ``num_features``."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


def check_dtypes(own: dict, state: dict, source: str) -> None:
    """Refuse ``state`` tensors that are not floating point where ``own`` (a model's state dict) is: an integer
    or boolean tensor would be cast into the float parameter silently. Keys missing from either are skipped."""
    bad = [
        k
        for k in own
        if k in state and own[k].is_floating_point() and not getattr(state[k], "is_floating_point", lambda: False)()
    ]
    if bad:
        k = bad[0]
        have = getattr(state[k], "dtype", type(state[k]).__name__)
        more = f" ({len(bad) - 1} more such keys)" if len(bad) > 1 else ""
        raise UserError(
            f"weights in {source} are not floating point: {k} is {have} but the model's {k} is {own[k].dtype}{more}"
        )


def load_strict(model: nn.Module, state: dict, source: str) -> None:
    """load_state_dict(strict=True), naming exactly which keys are missing or unexpected, which have the wrong
    shape, or which are not floating point where the model's are, on failure."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(
            f"weights in {source} do not fit {type(model).__name__}: "
            f"missing keys {missing or 'none'}, unexpected keys {unexpected or 'none'}"
        )
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise UserError(
            f"weights in {source} have wrong shapes for {bad[:5]} (expected {[tuple(own[k].shape) for k in bad[:5]]})"
        )
    check_dtypes(own, state, source)
    model.load_state_dict(state, strict=True)


def check_input_size(model: nn.Module, image_size: int, name: str) -> None:
    """Refuse an ``image_size`` the model cannot take, before any work: a ViT-style patch embedding built for
    a fixed size accepts only that size, and a dynamic one only multiples of its patch."""
    for m in model.modules():
        if not isinstance(m, PatchEmbed) or m.img_size is None:
            continue
        patch = tuple(m.patch_size)
        if m.strict_img_size and tuple(m.img_size) != (image_size, image_size):
            raise UserError(
                f"{name} takes {m.img_size[0]}x{m.img_size[1]} images only, not {image_size}x{image_size}"
                f": pass --image-size {m.img_size[0]}, or use a model that takes {image_size}x{image_size} images"
            )
        if not m.dynamic_img_pad and (image_size % patch[0] or image_size % patch[1]):
            raise UserError(
                f"{name} cuts images into {patch[0]}x{patch[1]} patches: --image-size {image_size} "
                f"is not a multiple of {patch[0]}"
            )
        break  # the input's embedding; later ones see feature maps


def export_backbone(
    backbone: nn.Module, out_dir: Path, data_config: dict, extra: dict, head: nn.Module | None = None
) -> Path:
    """Write ``model.safetensors`` (plain timm keys, backbone only) and timm's ``config.json``.

    ``extra`` is stored at the top level of config.json under ``scan_zoo`` (timm ignores it there;
    unknown keys inside ``pretrained_cfg`` would break timm's loader). A projection ``head`` is saved
    separately as ``head.safetensors`` so contrastive training can continue from the export.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    save_config_for_hf(backbone, str(out_dir / CONFIG_NAME), model_config={"scan_zoo": extra}, data_config=data_config)
    if head is not None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
            str(out_dir / HEAD_NAME),
            metadata={"format": "pt"},
        )
    return out_dir / WEIGHTS_NAME


def data_config_for(image_size: int, eval_resize: int | None, mean, std) -> dict:
    """timm's preprocessing description of the evaluation transform."""
    resize = eval_resize or int(round(image_size / 0.875))
    return {
        "input_size": (3, image_size, image_size),
        "crop_pct": image_size / resize,
        "crop_mode": "center",
        "interpolation": "bilinear",
        "mean": tuple(mean),
        "std": tuple(std),
    }
