"""``scan-zoo bench k-ablation``: SCAN at several K from one MoCo run at equal budgets (the paper's Fig. 3)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

from scan_zoo.common.errors import UserError
from scan_zoo.common.files import write_json
from scan_zoo.data import datasets as data_lib
from scan_zoo.eval.transfer import TASKS, TransferConfig
from scan_zoo.experiments.bench_runs import (
    QUICK_STEPS,
    details,
    machine,
    now,
    recipe_file,
    recipe_record,
    score_run,
    train_command,
    train_run,
)
from scan_zoo.experiments.charts import k_ablation_chart
from scan_zoo.train.config import build_config, load_yaml


def parse_k(value) -> int | str:
    if str(value).lower() == "all":
        return "all"
    try:
        k = int(value)
    except ValueError:
        raise UserError(f"K must be a non-negative integer or 'all', not {value!r}") from None
    if k < 0:
        raise UserError(f"K must be a non-negative integer or 'all', not {value!r}")
    return k


def steps_for(batch_size: int, num_images: int, k: int | str) -> int:
    """Optimiser steps per epoch (one process) of ``batch_size`` images at ``k`` (``"all"``: one image per anchor)."""
    group = 1 if k == "all" else int(k) + 1
    anchors = batch_size // group
    if anchors < 1:
        raise UserError(f"batch_size {batch_size} cannot hold an anchor and its K={k} neighbours")
    return math.ceil(num_images / anchors)


def run_k_ablation(
    ks: Sequence = (0, 1, 2, 4, 8, "all"),
    seed: int = 0,
    out: str | Path = "runs/bench/k_ablation",
    recipes_dir: str | Path | None = None,
    moco_run: str | None = None,
    quick: bool = False,
    data_cache: str | None = None,
    num_workers: int = 2,
    command: str | None = None,
) -> dict:
    """SCAN at each K from one MoCo run, equal budgets (see the module docstring); scores, plot, results.json."""
    ks = list(dict.fromkeys(parse_k(k) for k in ks))
    if not ks:
        raise UserError("name at least one K")
    out = Path(out)
    scan_recipe = recipe_file(recipes_dir, "scan")
    scan_values = load_yaml(scan_recipe)
    common = {"num_workers": num_workers, "seed": seed, **({"data_cache": data_cache} if data_cache else {})}
    quick_layer = {"max_steps": QUICK_STEPS} if quick else {}
    tcfg = (
        TransferConfig.quick(num_workers=num_workers, cache_dir=str(out / "feature_cache"))
        if quick
        else TransferConfig(num_workers=num_workers, cache_dir=str(out / "feature_cache"))
    )
    start = time.perf_counter()

    # the MoCo run every arm starts from
    recipes = {"scan": recipe_record(scan_recipe)}
    if moco_run:
        moco_dir = Path(moco_run)
        if not (moco_dir / "model.safetensors").is_file():
            raise UserError(f"--moco-run {moco_dir} holds no model.safetensors (a finished MoCo run or export)")
        moco = {"run_dir": str(moco_dir), "trained_now": False, "command": None}
    else:
        moco_recipe = recipe_file(recipes_dir, "moco")
        recipes["moco"] = recipe_record(moco_recipe)
        moco_dir = out / f"seed{seed}" / "moco"
        extra = {"seed": seed, "output_dir": moco_dir, **quick_layer}
        run = train_run([load_yaml(moco_recipe), common, quick_layer], moco_dir, train_command(moco_recipe, extra))
        moco = {
            "run_dir": str(moco_dir),
            "trained_now": run["trained_now"],
            "command": run["command"],
            "train_seconds": run["train_seconds"],
            "steps": run["steps"],
        }
    base = build_config(
        scan_values, common, quick_layer, {"appearance_model": str(moco_dir), "init_from": str(moco_dir)}
    )
    root = data_lib.resolve_data_root(base.data, base.data_cache, progress=False)
    num_images = len(data_lib.image_folder(root, "train"))
    budget = base.epochs * steps_for(base.batch_size, num_images, base.k)
    if base.max_steps is not None:
        budget = min(budget, base.max_steps)
    moco_scores = score_run(moco_dir, root, seed, tcfg)
    moco["scores"] = {key: moco_scores[key] for key, _, _ in TASKS}

    result = {
        "kind": "k_ablation",
        "date": now(),
        "command": command,
        "quick": quick,
        "seed": seed,
        "ks": [str(k) for k in ks],
        "recipes": recipes,
        "moco": moco,
        "transfer_settings": tcfg.to_dict(),
        "budget": {
            "steps": budget,
            "images_per_step": base.batch_size,
            "rule": "every K: the SCAN recipe's batch_size and its number of steps at its own K",
        },
        "tasks": [{"key": k, "task": t, "metric": m} for k, t, m in TASKS],
        "machine": machine(),
        "runs": [],
    }
    for k in ks:
        run_dir = out / f"seed{seed}" / f"k_{k}"
        spe = steps_for(base.batch_size, num_images, k)
        schedule = {"epochs": math.ceil(budget / spe), "max_steps": budget}
        if k == "all":
            layers = [scan_values, common, schedule, {"method": "supcon", "init_from": str(moco_dir)}]
            extra = {**common, "method": "supcon", "output_dir": run_dir, **schedule, "init_from": moco_dir}
            command_k = train_command(scan_recipe, extra) + "  # + encoders initialised from init_from (bench.py)"
            run = train_run(layers, run_dir, command_k, init_from=str(moco_dir))
        else:
            layers = [
                scan_values,
                common,
                schedule,
                {"k": k, "appearance_model": str(moco_dir), "init_from": str(moco_dir)},
            ]
            extra = {
                **common,
                "k": k,
                "output_dir": run_dir,
                **schedule,
                "appearance_model": moco_dir,
                "init_from": moco_dir,
            }
            run = train_run(layers, run_dir, train_command(scan_recipe, extra))
        scores = score_run(run_dir, root, seed, tcfg)
        result["runs"].append(
            {
                "k": str(k),
                "method": "supcon" if k == "all" else "scan",
                "run_dir": str(run_dir),
                "command": run["command"],
                "steps": run["steps"],
                "epochs": schedule["epochs"],
                "train_seconds": run["train_seconds"],
                "trained_now": run["trained_now"],
                "scores": {key: scores[key] for key, _, _ in TASKS},
                "details": details(scores),
                "transfer_seconds": scores["seconds"],
            }
        )
        result["best_k"] = {key: max(result["runs"], key=lambda r: r["scores"][key])["k"] for key, _, _ in TASKS}
        result["total_seconds"] = time.perf_counter() - start
        write_json(out / "results.json", result)
    chart = k_ablation_chart(result)
    chart.save(out / "k_ablation.png")
    result["chart"] = str(out / "k_ablation.png")
    result["total_seconds"] = time.perf_counter() - start
    write_json(out / "results.json", result)
    return result


def format_k_table(result: dict) -> str:
    header = ["K"] + [f"{task} {metric}" for _, task, metric in TASKS]
    rows = [header] + [[r["k"]] + [f"{r['scores'][key]:.2f}" for key, _, _ in TASKS] for r in result["runs"]]
    if result.get("moco", {}).get("scores"):
        rows.append(["MoCo (start)"] + [f"{result['moco']['scores'][key]:.2f}" for key, _, _ in TASKS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
