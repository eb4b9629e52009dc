"""``scan-zoo export RUN --name ORG/MODEL``: a training run that is not in the zoo, exported under the user's name.

The folder has the zoo's layout (``model.safetensors`` with plain timm keys, timm's ``config.json``, a
``README.md`` card, ``eval_results.json`` when the weights were measured), and every fact on the card is
read from the run itself:

- method, steps, epochs and the config from the run's ``config.json`` / ``config.yaml`` (train.py wrote them);
- the data: ``digits`` or the ImageFolder path, with the fingerprint the final checkpoint recorded;
- the recipe: the one the run records, else the shipped recipe of the same method that the run's config is
  closest to; the card lists every value that changes the weights and differs from it, so "this config is
  that recipe except these values" is true whichever file was passed;
- numbers only from the run's ``eval_results.json``, and only those measured on exactly these weights
  (their ``weights_sha256``); each comes with the ``eval_linear.py`` command that measures it again;
- ``crop_pct`` / interpolation / mean / std in ``config.json`` are those of the evaluation transform the
  numbers were measured with (``eval_linear.py``'s default for this run and data when there are none), so
  ``timm.data.create_transform`` rebuilds the transform of every number on the card.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import fields
from datetime import date
from pathlib import Path

import timm
from timm.models._hub import save_config_for_hf

from scan_zoo.common.errors import UserError
from scan_zoo.common.files import sha256_file, write_json
from scan_zoo.common.readers import read_json_object, read_safetensors, read_yaml_mapping
from scan_zoo.common.recipes import list_recipes, recipe_path
from scan_zoo.eval import probe
from scan_zoo.models.backbones import CONFIG_NAME, WEIGHTS_NAME, create_backbone, load_strict
from scan_zoo.train.checkpoints import list_checkpoints
from scan_zoo.train.config import TrainConfig, load_yaml
from scan_zoo.train.identity import identity_fields
from scan_zoo.zoo.cards import run_card
from scan_zoo.zoo.hub import CARD_NAME, RESULTS_NAME, read_export_config
from scan_zoo.zoo.registry import check_repo_id

#: the files an export writes; an existing one of these that is a symlink is never written through
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, RESULTS_NAME)
#: eval_linear.py options (and their ProbeConfig field) that reproduce a protocol's schedule
EVAL_FLAGS = (
    ("epochs", "epochs"),
    ("lr", "lr"),
    ("momentum", "momentum"),
    ("weight_decay", "weight-decay"),
    ("batch_size", "batch-size"),
    ("seed", "seed"),
)


def check_name(name) -> str:
    """``ORG/MODEL`` as the Hub allows it: ASCII letters, digits, '-', '_', '.'; one slash; no '..' or '--'."""
    if not isinstance(name, str) or "/" not in name:
        raise UserError(
            f"--name {name!r}: a run outside the zoo is exported as ORG/MODEL (e.g. my-org/my-model); "
            "`scan-zoo list` shows the zoo's own names"
        )
    try:
        return check_repo_id(name)
    except UserError:
        raise UserError(
            f"--name {name!r} is not a Hub model id: ORG/MODEL, each part letters, digits, '-', '_' or "
            "'.', starting and ending with a letter or digit; one slash, no '..' or '--'"
        ) from None


def check_out_dir(out_dir: Path, run_dir: Path, force: bool) -> Path:
    """The folder to write: not the run itself, not a symlink, empty or new unless ``force``."""
    if out_dir.is_symlink():
        raise UserError(f"--out {out_dir} is a symbolic link: refusing to write through it (name a real folder)")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    if out_dir.exists() and out_dir.resolve() == run_dir.resolve():
        raise UserError(f"--out {out_dir} is the run directory itself: export to another folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(
            f"--out {out_dir} exists and is not empty: choose a new folder or pass --force to replace "
            f"its {', '.join(EXPORT_FILES)}"
        )
    return out_dir


def _write_bytes(path: Path, data: bytes) -> None:
    """Write whole through a temporary file renamed over ``path``: a symlink at ``path`` is replaced, not followed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- the run's facts
def run_config(run_dir: Path, meta: dict) -> dict:
    """The run's whole config: ``config.yaml`` beside the weights, else the copy inside ``config.json``."""
    path = run_dir / "config.yaml"
    cfg = read_yaml_mapping(path) if path.is_file() else meta.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("method"), str) or not isinstance(cfg.get("data"), str):
        raise UserError(
            f"{run_dir} records no training config (config.yaml, or scan_zoo.config in {CONFIG_NAME}): "
            "export needs a run directory written by train.py"
        )
    return cfg


def data_facts(run_dir: Path, cfg: dict, steps) -> dict:
    """What the run trained on: ``digits`` or the folder, and the final checkpoint's data fingerprint."""
    fingerprint = None
    checkpoints = list_checkpoints(run_dir) if (run_dir / "checkpoints").is_dir() else []
    if checkpoints:
        state = read_json_object(checkpoints[-1] / "train_state.json")
        if state.get("step") == steps and isinstance(state.get("data"), dict):
            fingerprint = state["data"]
    return {
        "kind": "digits" if cfg["data"] == "digits" else "folder",
        "value": str(cfg["data"]),
        "fingerprint": fingerprint,
    }


def _same(a, b) -> bool:
    """Equal config values; a YAML list equals the same tuple."""
    return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)


def recipe_facts(cfg: dict, recorded: str | None) -> dict:
    """The recipe and the values (that change the weights) in which the run's config differs from it.

    ``recorded``: a recipe the run names (a shipped recipe's name or a file); else (or when it cannot be
    found) the shipped recipe (``scan_zoo/recipes``) of the run's method with the fewest differences, or
    train.py's defaults when those are closer. A shipped recipe is named by its name, which ``--config`` takes.
    """
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    keys = [k for k in identity_fields() if k in defaults]

    def differences(recipe: dict) -> list:
        base = {**defaults, **recipe}
        return [(k, cfg.get(k), base.get(k)) for k in keys if not _same(cfg.get(k), base.get(k))]

    try:
        found = recipe_path(recorded) if recorded else None
    except UserError:  # the file the run names is gone
        found = None
    if found:
        return {"path": str(recorded), "how": "recorded by the run", "differences": differences(load_yaml(found))}
    candidates = [(len(differences({})), 1, None, "train.py's defaults, no recipe file")]
    for path in (recipe_path(name) for name in list_recipes()):
        recipe = load_yaml(path)
        if recipe.get("method", defaults["method"]) == cfg["method"]:
            candidates.append((len(differences(recipe)), 0, path, "the shipped recipe closest to the run's config"))
    count, _, path, how = min(candidates, key=lambda c: c[:2])  # fewest differences; a recipe file wins a tie
    recipe = load_yaml(path) if path else {}
    return {"path": path.stem if path else None, "how": how, "differences": differences(recipe)}


def train_command(cfg: dict, recipe: dict) -> str:
    """A train.py command whose config equals the run's in every value that changes the weights."""
    parts = ["accelerate launch train.py"]
    if recipe["path"]:
        parts.append(f"--config {recipe['path']}")
    for key, value, _ in recipe["differences"]:
        value = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        parts.append(f"--{key.replace('_', '-')} {value}")
    parts.append(f"--data {cfg['data']}")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------ the numbers
def measured_results(run_dir: Path, digest: str) -> tuple[dict, list]:
    """``(results measured on exactly these weights, names of those left out)`` from the run's eval_results.json."""
    path = run_dir / RESULTS_NAME
    if not path.is_file():
        return {}, []
    kept, dropped = {}, []
    for name, r in read_json_object(path).items():
        ok = isinstance(r, dict) and r.get("weights_sha256") == digest and isinstance(r.get("protocol"), dict)
        (kept.__setitem__(name, r) if ok else dropped.append(name))
    return kept, dropped


def eval_command(target: str, result: dict) -> str:
    """The eval_linear.py command that measures ``result`` again on ``target``."""
    p, knn = result["protocol"], result.get("knn", {})
    default = probe.ProbeConfig()
    parts = [f"python eval_linear.py {target} --data {result.get('dataset', 'digits')} --protocol {p['name']}"]
    parts += [f"--{flag} {p[key]}" for key, flag in EVAL_FLAGS if key in p and p[key] != getattr(default, key)]
    if "milestones" in p and tuple(p["milestones"]) != default.milestones:
        parts.append("--milestones " + " ".join(map(str, p["milestones"])))
    parts.append(f"--image-size {p['image_size']} --eval-resize {p['eval_resize']}")
    if p["name"] == "moco" and p.get("crop_scale"):
        parts.append(f"--crop-scale-min {p['crop_scale'][0]} --crop-scale-max {p['crop_scale'][1]}")
        parts.append("--hflip" if p.get("hflip") else "--no-hflip")
    for key, flag, default_value in (
        ("k", "knn-k", default.knn_k),
        ("temperature", "knn-temperature", default.knn_temperature),
    ):
        if key in knn and knn[key] != default_value:
            parts.append(f"--{flag} {knn[key]}")
    return " ".join(parts)


def preprocessing(model, weights: Path, data: str, results: dict) -> dict:
    """timm's fields of the evaluation transform behind the card's numbers (eval_linear.py's default without any).

    The transform is built by the probe's own code and read back: crop_pct = crop / resize, the Resize's
    interpolation, the normalisation.
    """
    configs = []
    for r in results.values():
        p = r["protocol"]
        configs.append(
            probe.ProbeConfig(
                image_size=p["image_size"], eval_resize=p["eval_resize"], mean=tuple(p["mean"]), std=tuple(p["std"])
            )
        )
    if not configs:
        configs = [probe.ProbeConfig()]
    resolved = [probe.resolve_config(c, probe.model_preprocessing(model, weights), data) for c in configs]
    seen = {(c.image_size, c.eval_resize, c.mean, c.std) for c in resolved}
    if len(seen) > 1:
        raise UserError(
            f"the run's results were measured under different evaluation transforms {sorted(seen)}: one "
            "config.json cannot describe them all; evaluate once more at one transform"
        )
    cfg = resolved[0]
    resize = next(t for t in probe.eval_transform(cfg).transforms if type(t).__name__ == "Resize")
    return {
        "input_size": (3, cfg.image_size, cfg.image_size),
        "crop_pct": cfg.image_size / cfg.eval_resize,
        "crop_mode": "center",
        "interpolation": resize.interpolation.value,
        "mean": tuple(cfg.mean),
        "std": tuple(cfg.std),
        "eval_resize": cfg.eval_resize,
        "source": "the evaluation of the numbers below"
        if results
        else "eval_linear.py's default for this run's data (no number was measured)",
    }


# ---------------------------------------------------------------------------------------------- export
def export_run(run_dir: str | Path, name: str, out_dir: str | Path, force: bool = False) -> Path:
    """Export the train.py run at ``run_dir`` as ``name`` (ORG/MODEL) into ``out_dir``; see the module docstring."""
    name = check_name(name)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    src_cfg = read_export_config(run_dir)
    meta = src_cfg.get("scan_zoo") or {}
    arch = src_cfg.get("architecture")
    cfg = run_config(run_dir, meta)
    check_out_dir(out_dir, run_dir, force)
    weights = run_dir / WEIGHTS_NAME
    state = read_safetensors(weights)
    model = create_backbone(arch)
    load_strict(model, state, str(weights))  # exactly the backbone, nothing more or less
    digest = sha256_file(weights)
    results, dropped = measured_results(run_dir, digest)
    data = "digits" if cfg["data"] == "digits" else str(cfg["data"])
    prep = preprocessing(model, weights, data, results)
    recipe = recipe_facts(cfg, meta.get("recipe"))
    facts = {
        "name": name,
        "arch": arch,
        "method": cfg["method"],
        "steps": meta.get("steps"),
        "epochs": meta.get("epochs"),
        "num_train_images": meta.get("num_train_images"),
        "data": data_facts(run_dir, cfg, meta.get("steps")),
        "recipe": recipe,
        "train_command": train_command(cfg, recipe),
        "sha256": digest,
        "preprocess": prep,
        "starts": {k: cfg[k] for k in ("init_from", "appearance_model", "neighbors") if cfg.get(k)},
        "results": results,
        "dropped": dropped,
        "eval_commands": {k: eval_command(f"hf-hub:{name}", r) for k, r in results.items()},
        "measure_command": f"python eval_linear.py hf-hub:{name} --data {data} --protocol cached",
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    for f in EXPORT_FILES:
        if (out_dir / f).is_symlink() or (out_dir / f).is_dir():
            if not force or (out_dir / f).is_dir():
                raise UserError(f"{out_dir / f} is a symbolic link or a folder: refusing to write through it")
            (out_dir / f).unlink()
    tmp = out_dir / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
    shutil.copyfile(weights, tmp)
    os.replace(tmp, out_dir / WEIGHTS_NAME)
    default = timm.models.get_pretrained_cfg(arch)
    timm_fields = {k: v for k, v in prep.items() if k not in ("eval_resize", "source")}
    model.pretrained_cfg = {
        "architecture": arch,
        "num_classes": 0,
        **timm_fields,
        "classifier": default.classifier if default else None,
        "first_conv": default.first_conv if default else None,
    }
    scan_meta = {
        "name": name,
        "method": cfg["method"],
        "sha256": digest,
        "recipe": recipe["path"],
        "data": data,
        "train": {k: meta[k] for k in ("steps", "epochs", "num_train_images", "config") if k in meta},
        "exported": date.today().isoformat(),
    }
    tmp_cfg = out_dir / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    save_config_for_hf(model, str(tmp_cfg), model_config={"scan_zoo": scan_meta}, data_config=timm_fields)
    os.replace(tmp_cfg, out_dir / CONFIG_NAME)
    if results:
        write_json(out_dir / RESULTS_NAME, results)
    elif (out_dir / RESULTS_NAME).is_file():
        (out_dir / RESULTS_NAME).unlink()  # --force over an older export: no stale numbers beside the card
    _write_bytes(out_dir / CARD_NAME, run_card(facts).encode())
    return out_dir
