"""Foreign checkpoints in (MoCo v1/v2/v3, scan_zoo training checkpoints), detectron2 out.

Everything that comes in is read with :mod:`scan_zoo.common.readers` (``torch.load(weights_only=True)`` after a bound
on the archive's inflated size, or safetensors), converted once to
plain timm keys and checked strictly against the timm architecture: the projection head, key encoder
and queue are dropped, and any other missing or unexpected key is named in the error.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from scan_zoo.common.errors import UserError
from scan_zoo.common.readers import read_pth, read_safetensors
from scan_zoo.models.backbones import check_dtypes, create_backbone

#: the backbone's prefix in each known checkpoint layout, and the head keys (relative to it) to drop
LAYOUTS = {
    "moco_v1_v2": ("module.encoder_q.", re.compile(r"^fc\.")),  # facebookresearch/moco main_moco.py
    "moco_v3": ("module.base_encoder.", re.compile(r"^(fc|head)\.")),  # facebookresearch/moco-v3
    "scan_zoo": ("encoder_q.backbone.", None),  # our contrastive training checkpoints (model.safetensors)
    "scan_zoo_supervised": ("encoder.", None),  # our cross-entropy training checkpoints
}


def read_checkpoint(path: str | Path) -> dict:
    """The state dict inside a ``.pth``/``.pth.tar``/``.safetensors`` file, never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = read_pth(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state dict of tensors")
    return obj


def detect_layout(state: dict) -> str:
    for name, (prefix, _) in LAYOUTS.items():
        if any(k.startswith(prefix) for k in state):
            return name
    raise UserError("unknown checkpoint layout: no key starts with " + ", ".join(repr(p) for p, _ in LAYOUTS.values()))


def to_timm(state: dict, arch: str, layout: str | None = None, reference=None, source: str | None = None) -> dict:
    """Backbone weights in plain timm keys for ``arch`` (built with ``num_classes=0``), checked strictly.

    ``reference`` is an already built ``arch`` backbone to check against (saves building another); ``source``
    names the file in errors.
    """
    layout = layout or detect_layout(state)
    prefix, head = LAYOUTS[layout]
    out = {}
    for k, v in state.items():
        if not k.startswith(prefix):
            continue  # key encoder, queue, projection head of other encoders
        name = k[len(prefix) :]
        if head is not None and head.match(name):
            continue  # the projection head of the query encoder
        out[name] = v
    want = (reference if reference is not None else create_backbone(arch)).state_dict()
    missing = sorted(set(want) - set(out))
    unexpected = sorted(set(out) - set(want))
    if missing or unexpected:
        raise UserError(
            f"{layout} checkpoint does not fit timm's {arch}: missing keys {missing or 'none'}, "
            f"unexpected keys {unexpected or 'none'}"
        )
    bad = sorted(k for k in want if tuple(want[k].shape) != tuple(out[k].shape))
    if bad:
        raise UserError(f"{layout} checkpoint has wrong shapes for {arch}: {bad[:5]}")
    check_dtypes(want, out, f"the {layout} checkpoint {source}" if source else f"the {layout} checkpoint")
    return {k: out[k].detach().clone().contiguous() for k in want}


def detectron2_name(key: str) -> str:
    """timm ResNet key -> detectron2 ResNet key (the mapping MoCo's detection transfer uses)."""
    if not key.startswith("layer"):
        key = "stem." + key  # conv1, bn1
    key = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
    key = re.sub(r"\bbn(\d)\b", r"conv\1.norm", key)
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def to_detectron2(state: dict) -> dict:
    """A detectron2 checkpoint dict (numpy arrays) from a timm ResNet backbone state dict."""
    if any(not (k.startswith(("conv1.", "bn1.", "layer"))) for k in state):
        raise UserError("detectron2 export needs a timm ResNet backbone (conv1, bn1, layer1-4)")
    model = {
        detectron2_name(k): v.detach().cpu().numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")
    }
    return {"model": model, "__author__": "scan_zoo", "matching_heuristics": True}
