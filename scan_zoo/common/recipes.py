"""The training recipes shipped inside the package (``scan_zoo/recipes/*.yaml``), found by name.

Read through :mod:`importlib.resources`, so an installed (non-editable) package has them too. A recipe is
named by its file stem (``scan_in1k``); ``--config`` takes such a name or a path to any YAML file.
``accelerate_*.yaml`` files beside them are Accelerate launch configs, not training recipes.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import yaml

from scan_zoo.common.errors import UserError

RECIPES_DIR = Path(str(files("scan_zoo") / "recipes"))
ACCELERATE_CONFIG = RECIPES_DIR / "accelerate_default.yaml"  # one process, no mixed precision: `scan-zoo-launch`


def list_recipes() -> list[str]:
    """Names of the shipped training recipes, sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if not p.stem.startswith("accelerate_"))


def recipe_path(name: str | Path) -> Path:
    """A shipped recipe by name (``scan_in1k`` or ``scan_in1k.yaml``), or else an existing YAML file's path."""
    text = str(name)
    stem = text[:-5] if text.endswith(".yaml") else text
    if "/" not in text and stem in list_recipes():
        return RECIPES_DIR / f"{stem}.yaml"
    path = Path(text).expanduser()
    if path.is_file():
        return path
    raise UserError(f"config {text!r} is neither a file nor a shipped recipe (shipped: {', '.join(list_recipes())})")


# The pipeline's recipe per stage, chosen by the data: the embedded digit scenes, or an ImageFolder.
PIPELINE_RECIPES = {
    "digits": {"moco": "digits_moco", "scan": "digits_scan"},
    "folder": {"moco": "moco_v2_in1k", "scan": "scan_in1k"},
}


def reference_processes(path: str | Path) -> int | None:
    """The process count a recipe was written for (its ``_meta.processes``), None where it states none."""
    try:
        meta = (yaml.safe_load(Path(path).read_text()) or {}).get("_meta") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    value = meta.get("processes") if isinstance(meta, dict) else None
    value = value.get("value") if isinstance(value, dict) else value
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def scaled_lr(recipe_lr: float, global_batch: int, recipe_global_batch: int) -> float:
    """The linear scaling rule (Goyal et al. 2017, MoCo's "lr 0.03 per 256 images"): the learning rate grows in
    proportion to the global batch, ``recipe_lr x global_batch / recipe_global_batch``."""
    return recipe_lr * global_batch / recipe_global_batch
