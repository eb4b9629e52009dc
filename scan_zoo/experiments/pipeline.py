"""Running methods: one training run, or the paper's whole pipeline (MoCo-v2 -> mining -> SCAN -> kNN)."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import torch

from scan_zoo.common.errors import UserError
from scan_zoo.common.paths import RECIPES_DIR
from scan_zoo.data import datasets as data_lib
from scan_zoo.eval.probe import ProbeConfig, evaluate_knn
from scan_zoo.train import run_lock
from scan_zoo.train.config import TrainConfig, build_config, load_yaml
from scan_zoo.train.events import Callback
from scan_zoo.train.mining import neighbors_for
from scan_zoo.train.trainer import Trainer, make_accelerator


def run_training(cfg: TrainConfig, callbacks: Iterable[Callback] = ()) -> dict:
    """Train one method (stage 1 mining included for SCAN when only an appearance model is named); ``callbacks``
    watch the run (:mod:`scan_zoo.train.events`).

    The run directory is locked first (:mod:`scan_zoo.train.run_lock`): a second run into it stops before any work."""
    acc = make_accelerator(Path(cfg.output_dir), dist_timeout=cfg.dist_timeout)
    with run_lock.hold(Path(cfg.output_dir), acc):
        return _run_training(cfg, acc, callbacks)


def _run_training(cfg: TrainConfig, acc, callbacks: Iterable[Callback]) -> dict:
    neighbors = None
    if cfg.method == "scan":
        if cfg.init_from is None and cfg.appearance_model is None:
            raise UserError("--method scan starts from a label-free model: pass --init-from MODEL "
                            "(or --init-from none for random weights, which is not the paper's method)")
        if cfg.init_from is None:
            cfg = dataclasses.replace(cfg, init_from=cfg.appearance_model)
        if cfg.init_from == "none":
            cfg = dataclasses.replace(cfg, init_from=None)
        with acc.main_process_first():
            root = data_lib.resolve_data_root(cfg.data, cfg.data_cache, progress=acc.is_main_process)
        neighbors = neighbors_for(cfg, root, Path(cfg.output_dir), acc)
    return Trainer(cfg, acc, neighbors, callbacks).fit()


def stage_recipe(stage: str) -> dict:
    path = RECIPES_DIR / f"digits_{stage}.yaml"
    if not path.is_file():
        raise UserError(f"the pipeline's recipe {path} is missing: run train.py from a scan_zoo checkout")
    return load_yaml(path)


def knn_evaluate(weights_dir: Path, cfg: TrainConfig, device: torch.device | str = "cpu") -> dict:
    """kNN top-1/top-5 of exported weights on the val split (train split as the memory bank), by
    ``eval_linear.py``'s protocol (:func:`scan_zoo.eval.probe.evaluate_knn`: the weights' own transform,
    Resize(37) + CenterCrop(32) on the digits): the figure eval_linear.py and the zoo table show."""
    probe_cfg = ProbeConfig(num_workers=cfg.num_workers, knn_k=cfg.knn_k, knn_temperature=cfg.knn_temperature,
                            progress=False)
    return evaluate_knn(str(weights_dir), cfg.data, probe_cfg, arch=cfg.model, data_cache=cfg.data_cache,
                        device=device)


def run_pipeline(layers: list[dict], callbacks: Iterable[Callback] = ()) -> dict:
    """MoCo-v2 stage, neighbour mining, SCAN stage initialised from MoCo, kNN of both.

    ``layers`` are the user's config layers (recipe file, command line); each stage applies them over
    its own recipe (``configs/digits_<stage>.yaml``). Stage directories: ``<output_dir>/<stage>``.
    """
    user = {}
    for layer in layers:
        user.update(layer)
    user.pop("method", None)
    out = Path(user.get("output_dir", TrainConfig.output_dir))
    results = {}
    moco_cfg = build_config(stage_recipe("moco"), user, {"method": "moco", "output_dir": str(out / "moco")})
    results["moco"] = run_training(moco_cfg, callbacks)
    moco_dir = Path(results["moco"]["run_dir"])
    if not results["moco"]["finished"]:
        return results
    scan_cfg = build_config(stage_recipe("scan"), user,
                            {"method": "scan", "output_dir": str(out / "scan"), "appearance_model": str(moco_dir),
                             "init_from": str(moco_dir)})
    results["scan"] = run_training(scan_cfg, callbacks)
    if not results["scan"]["finished"]:
        return results
    from accelerate import PartialState

    device = PartialState().device
    for stage, cfg in (("moco", moco_cfg), ("scan", scan_cfg)):
        results[stage]["knn"] = knn_evaluate(Path(results[stage]["run_dir"]), cfg, device)
    return results


def format_knn_table(results: dict, k: int = 20) -> str:
    rows = [("method", "backbone", "steps", f"kNN top-1 (k={k})", "kNN top-5", "weights")]
    for stage, r in results.items():
        if "knn" in r:
            rows.append((stage, r["model"], str(r["steps"]), f"{r['knn']['top1']:.2f}", f"{r['knn']['top5']:.2f}",
                         r["weights"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
