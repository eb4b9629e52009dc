"""What the benchmarks share: the methods and their recipes, training one run and scoring it (both resumable),
and summaries over seeds. See :mod:`scan_zoo.experiments.bench` for what the benchmarks measure."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch
import yaml

from scan_zoo.common.errors import UserError
from scan_zoo.common.files import sha256_file, write_json
from scan_zoo.common.recipes import RECIPES_DIR
from scan_zoo.data import datasets as data_lib
from scan_zoo.eval.transfer import TASKS, TransferConfig, transfer_scores
from scan_zoo.experiments.pipeline import run_training
from scan_zoo.train.config import build_config, load_yaml
from scan_zoo.train.trainer import Trainer, make_accelerator

logger = logging.getLogger("scan_zoo.experiments.bench")

METHODS = ("supervised", "moco", "supcon", "scan", "dsc")  # the paper's columns: FSup, MoCo, (SCL), SCAN; then DSC
TRAIN_ORDER = ("moco", "scan", "supcon", "supervised", "dsc")  # SCAN needs its seed's MoCo run first
LABELS = {"supervised": "FSup", "moco": "MoCo-v2", "supcon": "SupCon", "scan": "SCAN", "dsc": "DSC"}
RECIPE = "digits_{}.yaml"
QUICK_STEPS = 3  # optimiser steps per method under --quick
RUN_DONE = "bench_run.json"
SCORES_FILE = "transfer_scores.json"
MACHINE_KEYS = ("resume", "num_workers")  # config fields that do not change what is trained


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def recipes_root(recipes_dir: str | Path | None) -> Path:
    """``recipes_dir`` as given, or (None) the recipes shipped in the package."""
    return RECIPES_DIR if recipes_dir is None else Path(recipes_dir)


def recipe_file(recipes_dir: str | Path | None, method: str) -> Path:
    path = recipes_root(recipes_dir) / RECIPE.format(method)
    if not path.is_file():
        raise UserError(f"recipe {path} not found (bench recipes are {RECIPE.format('<method>')} in --recipes-dir)")
    return path


def recipe_record(path: Path) -> dict:
    return {"path": str(path), "sha256": sha256_file(path), "values": load_yaml(path)}


def train_command(recipe: Path, extra: dict) -> str:
    """The ``train.py`` command line that trains the same run."""
    args = "".join(f" --{k.replace('_', '-')} {v}" for k, v in extra.items() if v is not None)
    return f"python train.py --config {recipe}{args}"


def _config_record(cfg) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in MACHINE_KEYS}


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with fewer than two values)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" +- {std:.{digits}f}" if std is not None else "")


def train_run(layers: list[dict], run_dir: Path, command: str, init_from: str | None = None) -> dict:
    """Train (or resume) one run into ``run_dir``; a finished run of the same config is returned as it is.

    ``init_from`` initialises a ``supcon`` run's encoders from a label-free model (the K = all arm);
    ``scan`` runs take theirs from the config's ``init_from``, as the engine does.
    """
    cfg = build_config(*layers, {"output_dir": str(run_dir), "resume": "latest"})
    want = _config_record(cfg)
    done_file = run_dir / RUN_DONE
    if done_file.is_file():
        done = json.loads(done_file.read_text())
        if done.get("config") == want and (run_dir / "model.safetensors").is_file():
            logger.info("%s: finished before, not trained again", run_dir)
            return {**done, "trained_now": False}
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = {k: v for k, v in (yaml.safe_load(saved.read_text()) or {}).items() if k not in MACHINE_KEYS}
        if old != want:
            diff = sorted(k for k in set(old) | set(want) if old.get(k) != want.get(k))
            raise UserError(
                f"{run_dir} holds a run of another config (differs in {diff}): choose another --out or delete it"
            )
    start = time.perf_counter()
    if init_from is not None:
        if cfg.method != "supcon":
            raise ValueError("init_from is for the supcon (K = all) arm; scan runs use cfg.init_from")
        trainer = Trainer(cfg, make_accelerator(run_dir))
        # the engine initialises only scan runs from init_from; the K = all arm starts where SCAN starts
        trainer.init_from(init_from)
        summary = trainer.fit()  # a resumed run loads its checkpoint over this initialisation
    else:
        summary = run_training(cfg)
    if not summary["finished"]:
        raise UserError(f"{run_dir} stopped at step {summary['steps']}: run the bench again to continue")
    done = {
        "method": cfg.method,
        "seed": cfg.seed,
        "steps": summary["steps"],
        "epochs": summary["epochs"],
        "train_seconds": time.perf_counter() - start,
        "finished_at": now(),
        "command": command,
        "weights": str(run_dir / "model.safetensors"),
        "config": want,
    }
    write_json(done_file, done)
    return {**done, "trained_now": True}


def _settings_key(tcfg: TransferConfig) -> dict:
    return {
        k: v
        for k, v in tcfg.to_dict().items()
        if k not in ("cache_dir", "progress", "num_workers", "extract_batch_size")
    }


def score_run(run_dir: Path, data_root: Path, seed: int, tcfg: TransferConfig) -> dict:
    """:func:`~scan_zoo.eval.transfer.transfer_scores` of a run's weights, cached in ``transfer_scores.json``."""
    digest = sha256_file(run_dir / "model.safetensors")
    path = run_dir / SCORES_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        want = _settings_key(tcfg)
        if (
            old.get("weights_sha256") == digest
            and old.get("seed") == seed
            and {k: (old.get("settings") or {}).get(k) for k in want} == want
        ):
            logger.info("%s: scored before, not scored again", run_dir)
            return old
    scores = transfer_scores(str(run_dir), data_root, seed, tcfg)
    scores["weights_sha256"] = digest
    write_json(path, scores)
    return scores


def data_root(layers: list[dict]) -> Path:
    cfg = build_config(*layers)
    return data_lib.resolve_data_root(cfg.data, cfg.data_cache, progress=False)


def machine() -> dict:

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpus": os.cpu_count(),
    }


def summarise(runs: list[dict], methods: Sequence[str]) -> dict:
    """``{task key: {method: {"values", "seeds", "mean", "std", "n"}}}`` over the scored runs."""
    out = {}
    for key, _, _ in TASKS:
        out[key] = {}
        for m in methods:
            rows = [r for r in runs if r["method"] == m and r.get("scores")]
            if rows:
                mean, std = mean_std([r["scores"][key] for r in rows])
                out[key][m] = {
                    "values": [r["scores"][key] for r in rows],
                    "seeds": [r["seed"] for r in rows],
                    "mean": mean,
                    "std": std,
                    "n": len(rows),
                }
    return out


def winners(summary: dict) -> dict:
    """The method with the highest mean per task."""
    return {key: max(cells, key=lambda m: cells[m]["mean"]) for key, cells in summary.items() if cells}


def details(scores: dict) -> dict:
    keep = (
        "semantic_top5",
        "semantic_knn_top1",
        "appearance_r2_by_factor",
        "appearance_alpha",
        "box_train_l1",
        "seg_iou_by_class",
        "seg_train_ce",
    )
    return {k: scores[k] for k in keep if k in scores}
