"""Every way a user names a backbone, loaded strictly: a zoo tag, a run directory or checkpoint, a
``model.safetensors`` with its ``config.json``, timm's ``local-dir:``, or a timm name (random weights)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from scan_zoo.common.errors import UserError
from scan_zoo.common.readers import (
    read_json_object,
    read_pth,
    read_safetensors,
    read_yaml_mapping,
)
from scan_zoo.models.backbones import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_dtypes,
    create_backbone,
    load_strict,
)
from scan_zoo.models.convert import to_timm


def _weights_file(ref: Path) -> Path:
    if ref.is_dir():
        ref = ref / WEIGHTS_NAME
    if not ref.is_file():
        raise UserError(f"no weights at {ref}")
    if ref.suffix != ".safetensors":
        raise UserError(f"{ref}: backbone weights must be a .safetensors file (convert other checkpoints first)")
    return ref


def read_config(weights: Path) -> dict:
    """timm's ``config.json`` beside ``weights`` (``{}`` when there is none); its architecture must be a name."""
    path = weights.parent / CONFIG_NAME
    if not path.exists():
        return {}
    cfg = read_json_object(path)
    if not isinstance(cfg.get("architecture", ""), str):
        raise UserError(f"{path}: 'architecture' must be a timm model name, not {cfg['architecture']!r}")
    return cfg


def _checkpoint_arch(path: Path) -> str | None:
    """The ``model`` a scan_zoo training checkpoint's ``config.yaml`` names."""
    arch = read_yaml_mapping(path).get("model")
    if arch is not None and not isinstance(arch, str):
        raise UserError(f"{path}: 'model' must be a timm model name, not {arch!r}")
    return arch


#: weights files timm's ``local-dir:`` loader looks for, in its order (timm.models._hub._PREFERRED_FILES)
_LOCAL_DIR_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def _read_local_dir(ref: str) -> tuple[dict | None, str]:
    """Check a ``local-dir:PATH`` folder's files before timm reads them: ``config.json`` is an object naming
    an architecture, and the weights file timm picks parses. Returns those weights and their path (``None``:
    timm's other file names, which timm reads itself)."""
    folder = Path(ref[len("local-dir:") :])
    if not folder.is_dir():
        raise UserError(
            f"{ref}: {folder} is not a directory (local-dir: names a folder holding {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    cfg = read_json_object(folder / CONFIG_NAME) if (folder / CONFIG_NAME).exists() else None
    if cfg is None:
        raise UserError(f"{ref}: {folder} has no {CONFIG_NAME} (timm's local-dir: needs one naming the architecture)")
    if not isinstance(cfg.get("architecture"), str):
        raise UserError(f"{folder / CONFIG_NAME} names no architecture (a string 'architecture' field)")
    for name in _LOCAL_DIR_WEIGHTS:
        path = folder / name
        if path.exists():
            return (read_safetensors(path) if path.suffix == ".safetensors" else read_pth(path)), str(path)
    return None, ref


def load_backbone(ref: str, arch: str | None = None) -> tuple[nn.Module, str]:
    """A backbone from a model reference, with its weights loaded strictly.

    ``ref`` is a directory holding ``model.safetensors`` (+ ``config.json``), a ``.safetensors`` file, or
    a timm name with pretrained weights (``hf-hub:...``, ``local-dir:...``, ``arch.tag``).
    ``arch`` names the architecture when the file has no config beside it.
    Returns ``(model, description)``.
    """
    path = Path(ref)
    if path.exists():
        weights = _weights_file(path)
        state = read_safetensors(weights)
        checkpoint_cfg = weights.parent / "config.yaml"
        is_checkpoint = (weights.parent / "train_state.json").is_file() and checkpoint_cfg.is_file()
        if is_checkpoint:  # a scan_zoo training checkpoint names its architecture in its config
            arch = _checkpoint_arch(checkpoint_cfg) or arch
        else:
            arch = read_config(weights).get("architecture") or arch
        if not arch:
            raise UserError(
                f"{weights} has no config.json beside it naming its architecture; name it "
                "(train.py --model, scan-zoo mine --arch)"
            )
        model = create_backbone(arch)
        if is_checkpoint:  # the query encoder's backbone, converted (and checked) like any foreign checkpoint
            state = to_timm(state, arch, reference=model, source=str(weights))
        load_strict(model, state, str(weights))
        return model, str(weights)
    if "/" in ref and not ref.startswith(("hf-hub:", "local-dir:")):
        raise UserError(f"model reference not found: {ref}")
    state, source = _read_local_dir(ref) if ref.startswith("local-dir:") else (None, ref)
    model = create_backbone(ref, pretrained=True)
    if isinstance(state, dict):
        check_dtypes(model.state_dict(), state, source)
    return model, ref
