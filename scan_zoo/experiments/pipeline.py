"""Running methods: one training run, or the paper's whole pipeline (MoCo-v2 -> mining -> SCAN -> kNN)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from scan_zoo.common.errors import UserError
from scan_zoo.common.recipes import PIPELINE_RECIPES, recipe_path, reference_processes, scaled_lr
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
            raise UserError(
                "--method scan starts from a label-free model: pass --init-from MODEL "
                "(or --init-from none for random weights, which is not the paper's method)"
            )
        if cfg.init_from is None:
            cfg = dataclasses.replace(cfg, init_from=cfg.appearance_model)
        if cfg.init_from == "none":
            cfg = dataclasses.replace(cfg, init_from=None)
        with acc.main_process_first():
            root = data_lib.resolve_data_root(cfg.data, cfg.data_cache, progress=acc.is_main_process)
        neighbors = neighbors_for(cfg, root, Path(cfg.output_dir), acc)
    return Trainer(cfg, acc, neighbors, callbacks).fit()


def stage_recipes(data: str, moco_config: str | None = None, scan_config: str | None = None) -> dict[str, Path]:
    """Each training stage's recipe file: the one the user names, else the one for this kind of data (the
    digits recipes for the embedded digit scenes, the ImageNet ones for an ImageFolder)."""
    kind = "digits" if data == "digits" else "folder"
    given = {"moco": moco_config, "scan": scan_config}
    return {stage: recipe_path(given[stage] or PIPELINE_RECIPES[kind][stage]) for stage in ("moco", "scan")}


def stage_config(recipe: Path, user: dict, fixed: dict, processes: int) -> tuple[TrainConfig, dict]:
    """One stage's config (recipe <- user layers <- what the pipeline sets) and what differs from the recipe.

    A recipe that states the process count it was written for (``_meta.processes``) has its lr scaled
    linearly to this run's global batch (:func:`scan_zoo.common.recipes.scaled_lr`) unless ``lr`` is given.
    Returns the config and ``{field: (recipe value, value used)}`` for every field that differs."""
    layer = load_yaml(recipe)
    base = build_config(layer, {k: v for k, v in fixed.items() if k == "method"})
    cfg = build_config(layer, user, fixed)
    ref = reference_processes(recipe)
    if ref is not None and "lr" not in user:
        cfg = dataclasses.replace(cfg, lr=scaled_lr(base.lr, cfg.batch_size * processes, base.batch_size * ref))
    diff = {
        f.name: (getattr(base, f.name), getattr(cfg, f.name))
        for f in dataclasses.fields(TrainConfig)
        if getattr(base, f.name) != getattr(cfg, f.name)
    }
    return cfg, diff


def format_stage(i: int, what: str, steps: int | None, recipe: Path, diff: dict) -> str:
    """``stage i/3: what (N steps, recipe FILE)`` and the values that differ from the recipe, one per line."""
    head = f"stage {i}/3: {what} ({f'{steps} steps, ' if steps is not None else ''}recipe {recipe})"
    lines = [head] + [f"  {name} = {used!r} (recipe: {was!r})" for name, (was, used) in diff.items()]
    return "\n".join(lines)


def format_timings(results: dict) -> str:
    """One line: the wall time of each stage that ran (and of the kNN evaluation)."""
    parts = []
    for stage, key, label in (
        ("moco", "moco", "stage 1/3 MoCo-v2"),
        ("scan", "mining", "stage 2/3 mining"),
        ("scan", "scan", "stage 3/3 SCAN"),
        ("scan", "knn", "kNN evaluation"),
    ):
        seconds = results.get(stage, {}).get(f"{key}_seconds")
        if seconds is not None:
            parts.append(f"{label} {seconds:.1f} s")
    return "wall time: " + ", ".join(parts)


def knn_evaluate(weights_dir: Path, cfg: TrainConfig, device: torch.device | str = "cpu") -> dict:
    """kNN top-1/top-5 of exported weights on the val split (train split as the memory bank), by
    ``eval_linear.py``'s protocol (:func:`scan_zoo.eval.probe.evaluate_knn`: the weights' own transform,
    Resize(37) + CenterCrop(32) on the digits): the figure eval_linear.py and the zoo table show."""
    probe_cfg = ProbeConfig(
        num_workers=cfg.num_workers, knn_k=cfg.knn_k, knn_temperature=cfg.knn_temperature, progress=False
    )
    return evaluate_knn(str(weights_dir), cfg.data, probe_cfg, arch=cfg.model, data_cache=cfg.data_cache, device=device)


def run_pipeline(
    layers: list[dict],
    moco_config: str | None = None,
    scan_config: str | None = None,
    callbacks: Iterable[Callback] = (),
) -> dict:
    """MoCo-v2 stage, neighbour mining, SCAN stage initialised from MoCo, kNN of both.

    ``layers`` are the user's config layers (``--config`` file, command line); each stage applies them over
    its own recipe (:func:`stage_recipes`: chosen by the data unless named). Stage directories:
    ``<output_dir>/<stage>``. The main process prints each stage with its step count, recipe and the values
    that differ from it before the stage runs; each stage's wall time is in ``<stage>_seconds``.
    """
    user = {}
    for layer in layers:
        user.update(layer)
    user.pop("method", None)
    out = Path(user.get("output_dir", TrainConfig.output_dir))
    recipes = stage_recipes(str(user.get("data", TrainConfig.data)), moco_config, scan_config)
    results = {}
    # the Accelerator first: it forms the process group (gloo on a CPU) that every later state shares
    dist_timeout = build_config(load_yaml(recipes["moco"]), user, {"method": "moco"}).dist_timeout
    state = acc = make_accelerator(out / "moco", dist_timeout=dist_timeout)
    say = print if state.is_main_process else (lambda *a, **k: None)
    moco_cfg, diff = stage_config(
        recipes["moco"], user, {"method": "moco", "output_dir": str(out / "moco")}, state.num_processes
    )
    with run_lock.hold(Path(moco_cfg.output_dir), acc):
        trainer = Trainer(moco_cfg, acc, callbacks=callbacks)
        say(format_stage(1, "MoCo-v2 pretraining", trainer.total_steps, recipes["moco"], diff), flush=True)
        start = time.perf_counter()
        results["moco"] = trainer.fit()
        results["moco"]["moco_seconds"] = time.perf_counter() - start
    moco_dir = Path(results["moco"]["run_dir"])
    if not results["moco"]["finished"]:
        return results
    scan_cfg, diff = stage_config(
        recipes["scan"],
        user,
        {
            "method": "scan",
            "output_dir": str(out / "scan"),
            "appearance_model": str(moco_dir),
            "init_from": str(moco_dir),
        },
        state.num_processes,
    )
    acc = make_accelerator(Path(scan_cfg.output_dir), dist_timeout=scan_cfg.dist_timeout)
    with run_lock.hold(Path(scan_cfg.output_dir), acc):
        say(
            f"stage 2/3: neighbour mining (K={scan_cfg.k} neighbours per image, with the stage-1 model {moco_dir})",
            flush=True,
        )
        start = time.perf_counter()
        with acc.main_process_first():
            root = data_lib.resolve_data_root(scan_cfg.data, scan_cfg.data_cache, progress=acc.is_main_process)
        neighbors = neighbors_for(scan_cfg, root, Path(scan_cfg.output_dir), acc)
        mining_seconds = time.perf_counter() - start
        trainer = Trainer(scan_cfg, acc, neighbors, callbacks)
        say(format_stage(3, "SCAN", trainer.total_steps, recipes["scan"], diff), flush=True)
        start = time.perf_counter()
        results["scan"] = trainer.fit()
        results["scan"].update(scan_seconds=time.perf_counter() - start, mining_seconds=mining_seconds)
    if not results["scan"]["finished"]:
        return results
    start = time.perf_counter()
    device = state.device
    for stage, cfg in (("moco", moco_cfg), ("scan", scan_cfg)):
        results[stage]["knn"] = knn_evaluate(Path(results[stage]["run_dir"]), cfg, device)
    results["scan"]["knn_seconds"] = time.perf_counter() - start
    return results


def format_knn_table(results: dict, k: int = 20) -> str:
    rows = [("method", "backbone", "steps", f"kNN top-1 (k={k})", "kNN top-5", "weights")]
    for stage, r in results.items():
        if "knn" in r:
            rows.append(
                (stage, r["model"], str(r["steps"]), f"{r['knn']['top1']:.2f}", f"{r['knn']['top5']:.2f}", r["weights"])
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
