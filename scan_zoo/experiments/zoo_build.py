"""``scan-zoo build-digits``: train, evaluate and ship the zoo's ``*_digits`` weights from their recipes.

Each shipped entry is trained by the project's own pipeline from its committed recipe
(``scan_zoo/recipes/digits_<method>.yaml``; SCAN mines its neighbours with, and starts from, the MoCo entry's
run), evaluated by ``eval_linear.py``'s code (cached linear protocol + kNN), exported into the package
(``scan_zoo/weights/<name>/``) and its sha256 recorded in the lock file. No number is typed in: the
model cards and the README table read the ``eval_results.json`` written here.

Runs resume: an entry whose run already finished is only re-evaluated and re-exported.
"""

from __future__ import annotations

import logging
from datetime import date
from pathlib import Path

from scan_zoo.common.errors import UserError
from scan_zoo.common.files import sha256_file
from scan_zoo.common.recipes import recipe_path
from scan_zoo.eval.probe import (
    ProbeConfig,
    evaluate_model,
    merge_results,
    results_path,
)
from scan_zoo.experiments.pipeline import run_training
from scan_zoo.train.config import build_config, load_yaml
from scan_zoo.zoo.hub import export
from scan_zoo.zoo.registry import ENTRIES, ZooEntry, record

logger = logging.getLogger(__name__)

ORDER = ("moco", "scan", "supcon", "supervised", "dsc")  # SCAN needs the MoCo run (stage 0 and stage-1 appearance)
PORTABLE_RESULT_KEYS = ("data_root", "weights", "model", "feature_cache")  # machine-specific paths, not shipped


def shipped_entries(names: list[str] | None = None) -> list[ZooEntry]:
    entries = [e for e in ENTRIES if e.shipped]
    if names:
        unknown = sorted(set(names) - {e.name for e in entries})
        if unknown:
            raise UserError(f"not shipped zoo entries: {unknown} (choose from {[e.name for e in entries]})")
        entries = [e for e in entries if e.name in names]
    return sorted(entries, key=lambda e: ORDER.index(e.method))


def train_entry(entry: ZooEntry, work_dir: Path, num_workers: int) -> Path:
    run_dir = work_dir / entry.name
    layers = [
        load_yaml(recipe_path(entry.recipe)),
        dict(entry.overrides),
        {"output_dir": str(run_dir), "resume": "latest", "num_workers": num_workers},
    ]
    if entry.method == "scan":
        moco = next(e for e in ENTRIES if e.shipped and e.method == "moco" and e.arch == entry.arch)
        moco_dir = work_dir / moco.name
        if not (moco_dir / "model.safetensors").is_file():
            raise UserError(f"{entry.name} starts from {moco.name}: build that first")
        layers.append({"appearance_model": str(moco_dir), "init_from": str(moco_dir)})
    summary = run_training(build_config(*layers))
    if not summary["finished"]:
        raise UserError(f"{entry.name} stopped at step {summary['steps']}: run build-digits again to continue")
    return run_dir


def evaluate_run(run_dir: Path, num_workers: int) -> dict:
    """The cached linear protocol (MoCo's settings) with kNN, on the digits val split; written beside the run."""
    result = evaluate_model(str(run_dir), "digits", ProbeConfig(protocol="cached", num_workers=num_workers))
    for k in PORTABLE_RESULT_KEYS:
        result.pop(k, None)
    return merge_results(results_path(str(run_dir)), result)


def build_digits(
    work_dir: str | Path = "runs/zoo_digits", names: list[str] | None = None, num_workers: int = 2
) -> list[dict]:
    """Train (or resume), evaluate and ship the ``*_digits`` entries; returns one summary per entry."""
    work_dir = Path(work_dir)
    out = []
    for entry in shipped_entries(names):
        run_dir = train_entry(entry, work_dir, num_workers)
        results = evaluate_run(run_dir, num_workers)
        folder = export(run_dir, entry.name, entry.weights_dir, results)
        digest = sha256_file(folder / "model.safetensors")
        record(entry.name, {"sha256": digest, "built": date.today().isoformat(), "recipe": entry.recipe})
        out.append({"name": entry.name, "folder": str(folder), "sha256": digest, "results": results})
        logger.info("shipped %s (%s)", entry.name, digest[:12])
    return out
