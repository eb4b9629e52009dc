"""``scan-zoo bench transfer``: every method for every seed, scored by the transfer suite (the paper's Table 1)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from scan_zoo.common.errors import UserError
from scan_zoo.common.files import write_json
from scan_zoo.eval.transfer import TASKS, TransferConfig
from scan_zoo.experiments.bench_runs import (
    LABELS,
    METHODS,
    QUICK_STEPS,
    TRAIN_ORDER,
    _settings_key,
    data_root,
    details,
    fmt,
    machine,
    now,
    recipe_file,
    recipe_record,
    score_run,
    summarise,
    train_command,
    train_run,
    winners,
)
from scan_zoo.experiments.charts import transfer_chart
from scan_zoo.train.config import load_yaml


def format_table(summary: dict, methods: Sequence[str]) -> str:
    """Plain-text Table 1: rows = tasks, columns = methods, mean +- std; ``*`` marks the best mean."""
    best = winners(summary)
    header = ["task", "metric"] + [LABELS.get(m, m) for m in methods]
    rows = [header]
    for key, task, metric in TASKS:
        cells = summary.get(key, {})
        row = [task, metric]
        for m in methods:
            c = cells.get(m)
            row.append(fmt(c["mean"], c["std"]) + (" *" if best.get(key) == m else "") if c else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_transfer_bench(
    methods: Sequence[str] = METHODS,
    seeds: Sequence[int] = (0, 1, 2),
    out: str | Path = "runs/bench/transfer",
    recipes_dir: str | Path | None = None,
    quick: bool = False,
    data_cache: str | None = None,
    num_workers: int = 2,
    command: str | None = None,
    merge: str | Path | None = None,
) -> dict:
    """Train, score and summarise (see the module docstring). Returns what ``results.json`` holds.

    ``merge``: a finished ``results.json`` whose runs of the methods not in ``methods`` are kept as they are.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise UserError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    methods = [m for m in METHODS if m in methods]
    seeds = list(dict.fromkeys(int(s) for s in seeds))[: 1 if quick else None]
    out = Path(out)
    base = _merge_base(merge, methods, seeds, quick, num_workers) if merge is not None else None
    needed = [m for m in TRAIN_ORDER if m in methods or (m == "moco" and "scan" in methods)]
    recipes = {m: recipe_file(recipes_dir, m) for m in needed}
    common = {"num_workers": num_workers}
    if data_cache:
        common["data_cache"] = data_cache
    quick_layer = {"max_steps": QUICK_STEPS} if quick else {}
    tcfg = (
        TransferConfig.quick(num_workers=num_workers, cache_dir=str(out / "feature_cache"))
        if quick
        else TransferConfig(num_workers=num_workers, cache_dir=str(out / "feature_cache"))
    )
    start = time.perf_counter()
    result = {
        "kind": "transfer",
        "date": now(),
        "command": command,
        "quick": quick,
        "methods": methods,
        "seeds": seeds,
        "tasks": [{"key": k, "task": t, "metric": m} for k, t, m in TASKS],
        "recipes": {m: recipe_record(p) for m, p in recipes.items()},
        "transfer_settings": tcfg.to_dict(),
        "machine": machine(),
        "runs": [],
    }
    shown = methods  # the columns of the table: these methods, and with --merge the file's others
    if base is not None:
        kept = [r for r in base["runs"] if r["method"] not in methods]
        shown = [m for m in METHODS if m in methods or m in base.get("methods", [])]
        result.update(
            methods=shown,
            command=f"{base.get('command')}; then {command}",
            runs=kept,
            recipes={**{m: r for m, r in (base.get("recipes") or {}).items() if m not in methods}, **result["recipes"]},
            merged_from={
                "path": str(merge),
                "date": base.get("date"),
                "command": base.get("command"),
                "machine": base.get("machine"),
                "total_seconds": base.get("total_seconds"),
                "methods_kept": [m for m in shown if m not in methods],
            },
        )
    for seed in seeds:
        moco_dir = None
        for method in needed:
            run_dir = out / f"seed{seed}" / method
            extra = {
                "seed": seed,
                "output_dir": run_dir,
                **({"data_cache": data_cache} if data_cache else {}),
                **quick_layer,
            }
            layers = [load_yaml(recipes[method]), {"seed": seed}, common, quick_layer]
            if method == "scan":
                layers.append({"appearance_model": str(moco_dir), "init_from": str(moco_dir)})
                extra.update(appearance_model=moco_dir, init_from=moco_dir)
            run = train_run(layers, run_dir, train_command(recipes[method], extra))
            if method == "moco":
                moco_dir = run_dir
            entry = {
                "method": method,
                "seed": seed,
                "run_dir": str(run_dir),
                "command": run["command"],
                "steps": run["steps"],
                "train_seconds": run["train_seconds"],
                "trained_now": run["trained_now"],
            }
            if method in methods:
                scores = score_run(run_dir, data_root(layers), seed, tcfg)
                entry.update(
                    scores={k: scores[k] for k, _, _ in TASKS},
                    details=details(scores),
                    transfer_seconds=scores["seconds"],
                )
            else:
                entry["note"] = "trained only as SCAN's stage 0 (not among --methods)"
            result["runs"].append(entry)
            result["summary"] = summarise(result["runs"], shown)
            result["winners"] = winners(result["summary"])
            result["total_seconds"] = time.perf_counter() - start
            write_json(out / "results.json", result)  # partial results survive an interruption
    chart = transfer_chart(result["summary"], shown, title=_chart_title(result))
    chart.save(out / "transfer.png")
    result["chart"] = str(out / "transfer.png")
    result["total_seconds"] = time.perf_counter() - start
    write_json(out / "results.json", result)
    return result


def _merge_base(path: str | Path, methods: Sequence[str], seeds: list[int], quick: bool, num_workers: int) -> dict:
    """The ``results.json`` to merge into, refused unless it was measured the way this run will be."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--merge {path}: no such results file")
    try:
        base = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--merge {path} is not valid JSON: {e}") from None
    if base.get("kind") != "transfer" or not isinstance(base.get("runs"), list):
        raise UserError(f"--merge {path} is not the results.json of `scan-zoo bench transfer`")
    if sorted(base.get("seeds", [])) != sorted(seeds):
        have = " ".join(map(str, base.get("seeds", [])))
        raise UserError(f"--merge {path} has seeds {base.get('seeds')}; run with --seeds {have}")
    if bool(base.get("quick")) != quick:
        raise UserError(f"--merge {path} was {'' if base.get('quick') else 'not '}a --quick run; this one must match")
    want = TransferConfig.quick(num_workers=num_workers) if quick else TransferConfig(num_workers=num_workers)
    have = {k: v for k, v in (base.get("transfer_settings") or {}).items() if k in _settings_key(want)}
    want = json.loads(json.dumps(_settings_key(want)))  # tuples as lists, as in the file
    if have != want:
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise UserError(f"--merge {path} was scored with other transfer settings (differ in {diff})")
    if not [r for r in base["runs"] if r["method"] not in methods]:
        raise UserError(f"--merge {path} holds no run of a method other than {list(methods)}: nothing to keep")
    return base


def _chart_title(result: dict) -> str:
    n = len(result["seeds"])
    return (
        f"Transfer on the digit scenes, frozen backbones ({n} seed{'s' if n != 1 else ''}"
        f"{', QUICK smoke run' if result.get('quick') else ''}); bars: mean, whiskers: +-1 std"
    )
