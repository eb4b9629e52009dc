"""``scan-zoo bench``: the SCAN paper's Table 1 (transfer) and Fig. 3 (K ablation) in miniature, on the digit scenes.

``bench transfer`` trains every method from its recipe (``<recipes-dir>/digits_<method>.yaml``) for
every seed, SCAN starting from -- and mining its neighbours with -- the same seed's MoCo run (as
``scan-zoo build-digits`` does), then scores each backbone with :func:`scan_zoo.transfer.transfer_scores`
(the head seeds are the run's seed). It prints a table shaped like the paper's Table 1 (rows = tasks,
columns = methods, cells = mean +- sample standard deviation over seeds), and writes ``results.json``
(every per-seed number, the recipes, the equivalent ``train.py`` commands, timings, date) and
``transfer.png`` (grouped bars, error bars = one standard deviation). DSC (label-free, dense) trains from
random weights like MoCo and is a fifth column.

``--merge RESULTS`` adds the methods named by ``--methods`` to a finished ``results.json`` (for example the
committed ``results/transfer_digits.json``): that file's runs of every other method are kept as recorded,
neither trained nor scored again (their run directories need not exist any more), and the merged result is
written to ``OUT/results.json`` and ``OUT/transfer.png``. Seeds, ``--quick`` and the transfer settings must be
the ones the file was made with, so every column is measured alike.

``bench k-ablation`` trains SCAN from one MoCo run for each K and scores each:

- ``K = 0``: SCAN's loss with no neighbours: each anchor's only positive is its own other view; the other
  images of the batch stay negatives (in-batch negatives on), so this is MoCo plus in-batch negatives at
  SCAN's schedule and temperature, not MoCo itself (the MoCo run is scored beside it as a reference).
- ``K = all``: every same-class image is a positive: the ``supcon`` method (same-class queue entries are
  positives too) with the SCAN recipe's schedule, and, like every SCAN arm, initialised from the MoCo run
  (the engine initialises only ``scan`` runs from ``init_from``, so this arm calls the trainer's
  initialisation itself; the resolved config records ``init_from``).
- Every arm has the same budget: the SCAN recipe's images per step (``batch_size``) and its number of
  optimiser steps (its epochs at its own K). An "epoch" (every image an anchor once) costs K + 1 times
  more steps at larger K, so equal epochs would give K = 8 nine times the compute of K = 0; equal steps
  keep compute equal and vary only who the positives are. ``epochs`` is raised to cover the steps and
  ``max_steps`` pins the schedule (cosine over the same number of steps for every K).

Runs resume: a finished run (``bench_run.json`` beside its weights, written with the config it was
trained with) is not trained again, and a scored run (``transfer_scores.json``, keyed by the weights'
sha256 and the head settings) is not scored again. A run directory holding a run of another config is
refused rather than mixed. ``--quick`` trains a few steps per method with tiny heads, one seed: a smoke
test of the machinery, not a measurement.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

from .errors import UserError
from .transfer import TASKS, TransferConfig

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
METHODS = ("supervised", "moco", "supcon", "scan", "dsc")  # the paper's columns: FSup, MoCo, (SCL), SCAN; then DSC
TRAIN_ORDER = ("moco", "scan", "supcon", "supervised", "dsc")  # SCAN needs its seed's MoCo run first
LABELS = {"supervised": "FSup", "moco": "MoCo-v2", "supcon": "SupCon", "scan": "SCAN", "dsc": "DSC"}
RECIPE = "digits_{}.yaml"
QUICK_STEPS = 3  # optimiser steps per method under --quick
RUN_DONE = "bench_run.json"
SCORES_FILE = "transfer_scores.json"
MACHINE_KEYS = ("resume", "num_workers")  # config fields that do not change what is trained
COLOURS = {"supervised": (120, 120, 120), "moco": (66, 133, 244), "supcon": (244, 160, 0), "scan": (219, 68, 55),
           "dsc": (15, 157, 88)}
TASK_COLOURS = [(66, 133, 244), (219, 68, 55), (15, 157, 88), (171, 71, 188)]


# -------------------------------------------------------------------------------------------- helpers
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def recipes_root(recipes_dir: str | Path) -> Path:
    """``recipes_dir`` as given, or (relative and missing here) inside the scan_zoo checkout."""
    path = Path(recipes_dir)
    if not path.is_dir() and not path.is_absolute() and (REPO_ROOT / path).is_dir():
        return REPO_ROOT / path
    return path


def recipe_file(recipes_dir: str | Path, method: str) -> Path:
    path = recipes_root(recipes_dir) / RECIPE.format(method)
    if not path.is_file():
        raise UserError(f"recipe {path} not found (bench recipes are {RECIPE.format('<method>')} in --recipes-dir)")
    return path


def recipe_record(path: Path) -> dict:
    from .config import load_yaml
    from .hub import sha256_file

    return {"path": str(path), "sha256": sha256_file(path), "values": load_yaml(path)}


def train_command(recipe: Path, extra: dict) -> str:
    """The ``train.py`` command line that trains the same run."""
    args = "".join(f" --{k.replace('_', '-')} {v}" for k, v in extra.items() if v is not None)
    return f"python train.py --config {recipe}{args}"


def _config_record(cfg) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in MACHINE_KEYS}


def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (None with fewer than two values)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(mean: Optional[float], std: Optional[float], digits: int = 2) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" +- {std:.{digits}f}" if std is not None else "")


# ---------------------------------------------------------------------------------------- train, score
def train_run(layers: list[dict], run_dir: Path, command: str, init_from: Optional[str] = None) -> dict:
    """Train (or resume) one run into ``run_dir``; a finished run of the same config is returned as it is.

    ``init_from`` initialises a ``supcon`` run's encoders from a label-free model (the K = all arm);
    ``scan`` runs take theirs from the config's ``init_from``, as the engine does.
    """
    from .config import build_config
    from .pipeline import run_training

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
        import yaml

        old = {k: v for k, v in (yaml.safe_load(saved.read_text()) or {}).items() if k not in MACHINE_KEYS}
        if old != want:
            diff = sorted(k for k in set(old) | set(want) if old.get(k) != want.get(k))
            raise UserError(f"{run_dir} holds a run of another config (differs in {diff}): "
                            "choose another --out or delete it")
    start = time.perf_counter()
    if init_from is not None:
        if cfg.method != "supcon":
            raise ValueError("init_from is for the supcon (K = all) arm; scan runs use cfg.init_from")
        from .engine import Trainer, make_accelerator

        trainer = Trainer(cfg, make_accelerator(run_dir))
        # the engine initialises only scan runs from init_from; the K = all arm starts where SCAN starts
        trainer._init_from(init_from)
        summary = trainer.fit()  # a resumed run loads its checkpoint over this initialisation
    else:
        summary = run_training(cfg)
    if not summary["finished"]:
        raise UserError(f"{run_dir} stopped at step {summary['steps']}: run the bench again to continue")
    done = {"method": cfg.method, "seed": cfg.seed, "steps": summary["steps"], "epochs": summary["epochs"],
            "train_seconds": time.perf_counter() - start, "finished_at": _now(), "command": command,
            "weights": str(run_dir / "model.safetensors"), "config": want}
    _write_json(done_file, done)
    return {**done, "trained_now": True}


def _settings_key(tcfg: TransferConfig) -> dict:
    return {k: v for k, v in tcfg.to_dict().items() if k not in ("cache_dir", "progress", "num_workers",
                                                                   "extract_batch_size")}


def score_run(run_dir: Path, data_root: Path, seed: int, tcfg: TransferConfig) -> dict:
    """:func:`~scan_zoo.transfer.transfer_scores` of a run's weights, cached in ``transfer_scores.json``."""
    from .hub import sha256_file
    from .transfer import transfer_scores

    digest = sha256_file(run_dir / "model.safetensors")
    path = run_dir / SCORES_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        want = _settings_key(tcfg)
        if old.get("weights_sha256") == digest and old.get("seed") == seed and \
                {k: (old.get("settings") or {}).get(k) for k in want} == want:
            logger.info("%s: scored before, not scored again", run_dir)
            return old
    scores = transfer_scores(str(run_dir), data_root, seed, tcfg)
    scores["weights_sha256"] = digest
    _write_json(path, scores)
    return scores


def _data_root(layers: list[dict]) -> Path:
    from . import data as data_lib
    from .config import build_config

    cfg = build_config(*layers)
    return data_lib.resolve_data_root(cfg.data, cfg.data_cache, progress=False)


def _machine() -> dict:
    import platform

    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cpus": os.cpu_count()}


# -------------------------------------------------------------------------------------------- summaries
def summarise(runs: list[dict], methods: Sequence[str]) -> dict:
    """``{task key: {method: {"values", "seeds", "mean", "std", "n"}}}`` over the scored runs."""
    out = {}
    for key, _, _ in TASKS:
        out[key] = {}
        for m in methods:
            rows = [r for r in runs if r["method"] == m and r.get("scores")]
            if rows:
                mean, std = mean_std([r["scores"][key] for r in rows])
                out[key][m] = {"values": [r["scores"][key] for r in rows], "seeds": [r["seed"] for r in rows],
                               "mean": mean, "std": std, "n": len(rows)}
    return out


def winners(summary: dict) -> dict:
    """The method with the highest mean per task."""
    return {key: max(cells, key=lambda m: cells[m]["mean"]) for key, cells in summary.items() if cells}


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


# ------------------------------------------------------------------------------------------- transfer
def run_transfer_bench(methods: Sequence[str] = METHODS, seeds: Sequence[int] = (0, 1, 2),
                       out: str | Path = "runs/bench/transfer", recipes_dir: str | Path = "configs",
                       quick: bool = False, data_cache: Optional[str] = None, num_workers: int = 2,
                       command: Optional[str] = None, merge: Optional[str | Path] = None) -> dict:
    """Train, score and summarise (see the module docstring). Returns what ``results.json`` holds.

    ``merge``: a finished ``results.json`` whose runs of the methods not in ``methods`` are kept as they are.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise UserError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    methods = [m for m in METHODS if m in methods]
    seeds = list(dict.fromkeys(int(s) for s in seeds))[:1 if quick else None]
    out = Path(out)
    base = _merge_base(merge, methods, seeds, quick, num_workers) if merge is not None else None
    needed = [m for m in TRAIN_ORDER if m in methods or (m == "moco" and "scan" in methods)]
    recipes = {m: recipe_file(recipes_dir, m) for m in needed}
    from .config import load_yaml

    common = {"num_workers": num_workers}
    if data_cache:
        common["data_cache"] = data_cache
    quick_layer = {"max_steps": QUICK_STEPS} if quick else {}
    tcfg = TransferConfig.quick(num_workers=num_workers, cache_dir=str(out / "feature_cache")) if quick else \
        TransferConfig(num_workers=num_workers, cache_dir=str(out / "feature_cache"))
    start = time.perf_counter()
    result = {"kind": "transfer", "date": _now(), "command": command, "quick": quick, "methods": methods,
              "seeds": seeds, "tasks": [{"key": k, "task": t, "metric": m} for k, t, m in TASKS],
              "recipes": {m: recipe_record(p) for m, p in recipes.items()},
              "transfer_settings": tcfg.to_dict(), "machine": _machine(), "runs": []}
    shown = methods  # the columns of the table: these methods, and with --merge the file's others
    if base is not None:
        kept = [r for r in base["runs"] if r["method"] not in methods]
        shown = [m for m in METHODS if m in methods or m in base.get("methods", [])]
        result.update(methods=shown,
                      command=f"{base.get('command')}; then {command}", runs=kept,
                      recipes={**{m: r for m, r in (base.get("recipes") or {}).items() if m not in methods},
                               **result["recipes"]},
                      merged_from={"path": str(merge), "date": base.get("date"), "command": base.get("command"),
                                   "machine": base.get("machine"), "total_seconds": base.get("total_seconds"),
                                   "methods_kept": [m for m in shown if m not in methods]})
    for seed in seeds:
        moco_dir = None
        for method in needed:
            run_dir = out / f"seed{seed}" / method
            extra = {"seed": seed, "output_dir": run_dir, **({"data_cache": data_cache} if data_cache else {}),
                     **quick_layer}
            layers = [load_yaml(recipes[method]), {"seed": seed}, common, quick_layer]
            if method == "scan":
                layers.append({"appearance_model": str(moco_dir), "init_from": str(moco_dir)})
                extra.update(appearance_model=moco_dir, init_from=moco_dir)
            run = train_run(layers, run_dir, train_command(recipes[method], extra))
            if method == "moco":
                moco_dir = run_dir
            entry = {"method": method, "seed": seed, "run_dir": str(run_dir), "command": run["command"],
                     "steps": run["steps"], "train_seconds": run["train_seconds"], "trained_now": run["trained_now"]}
            if method in methods:
                scores = score_run(run_dir, _data_root(layers), seed, tcfg)
                entry.update(scores={k: scores[k] for k, _, _ in TASKS}, details=_details(scores),
                             transfer_seconds=scores["seconds"])
            else:
                entry["note"] = "trained only as SCAN's stage 0 (not among --methods)"
            result["runs"].append(entry)
            result["summary"] = summarise(result["runs"], shown)
            result["winners"] = winners(result["summary"])
            result["total_seconds"] = time.perf_counter() - start
            _write_json(out / "results.json", result)  # partial results survive an interruption
    chart = transfer_chart(result["summary"], shown, title=_chart_title(result))
    chart.save(out / "transfer.png")
    result["chart"] = str(out / "transfer.png")
    result["total_seconds"] = time.perf_counter() - start
    _write_json(out / "results.json", result)
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


def _details(scores: dict) -> dict:
    keep = ("semantic_top5", "semantic_knn_top1", "appearance_r2_by_factor", "appearance_alpha", "box_train_l1",
            "seg_iou_by_class", "seg_train_ce")
    return {k: scores[k] for k in keep if k in scores}


def _chart_title(result: dict) -> str:
    n = len(result["seeds"])
    return (f"Transfer on the digit scenes, frozen backbones ({n} seed{'s' if n != 1 else ''}"
            f"{', QUICK smoke run' if result.get('quick') else ''}); bars: mean, whiskers: +-1 std")


# ----------------------------------------------------------------------------------------- K ablation
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


def run_k_ablation(ks: Sequence = (0, 1, 2, 4, 8, "all"), seed: int = 0, out: str | Path = "runs/bench/k_ablation",
                   recipes_dir: str | Path = "configs", moco_run: Optional[str] = None, quick: bool = False,
                   data_cache: Optional[str] = None, num_workers: int = 2, command: Optional[str] = None) -> dict:
    """SCAN at each K from one MoCo run, equal budgets (see the module docstring); scores, plot, results.json."""
    from . import data as data_lib
    from .config import build_config, load_yaml

    ks = list(dict.fromkeys(parse_k(k) for k in ks))
    if not ks:
        raise UserError("name at least one K")
    out = Path(out)
    scan_recipe = recipe_file(recipes_dir, "scan")
    scan_values = load_yaml(scan_recipe)
    common = {"num_workers": num_workers, "seed": seed, **({"data_cache": data_cache} if data_cache else {})}
    quick_layer = {"max_steps": QUICK_STEPS} if quick else {}
    tcfg = TransferConfig.quick(num_workers=num_workers, cache_dir=str(out / "feature_cache")) if quick else \
        TransferConfig(num_workers=num_workers, cache_dir=str(out / "feature_cache"))
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
        moco = {"run_dir": str(moco_dir), "trained_now": run["trained_now"], "command": run["command"],
                "train_seconds": run["train_seconds"], "steps": run["steps"]}
    base = build_config(scan_values, common, quick_layer,
                        {"appearance_model": str(moco_dir), "init_from": str(moco_dir)})
    root = data_lib.resolve_data_root(base.data, base.data_cache, progress=False)
    num_images = len(data_lib.image_folder(root, "train"))
    budget = base.epochs * steps_for(base.batch_size, num_images, base.k)
    if base.max_steps is not None:
        budget = min(budget, base.max_steps)
    moco_scores = score_run(moco_dir, root, seed, tcfg)
    moco["scores"] = {key: moco_scores[key] for key, _, _ in TASKS}

    result = {"kind": "k_ablation", "date": _now(), "command": command, "quick": quick, "seed": seed,
              "ks": [str(k) for k in ks], "recipes": recipes, "moco": moco, "transfer_settings": tcfg.to_dict(),
              "budget": {"steps": budget, "images_per_step": base.batch_size,
                         "rule": "every K: the SCAN recipe's batch_size and its number of steps at its own K"},
              "tasks": [{"key": k, "task": t, "metric": m} for k, t, m in TASKS], "machine": _machine(), "runs": []}
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
            layers = [scan_values, common, schedule, {"k": k, "appearance_model": str(moco_dir),
                                                      "init_from": str(moco_dir)}]
            extra = {**common, "k": k, "output_dir": run_dir, **schedule, "appearance_model": moco_dir,
                     "init_from": moco_dir}
            run = train_run(layers, run_dir, train_command(scan_recipe, extra))
        scores = score_run(run_dir, root, seed, tcfg)
        result["runs"].append({"k": str(k), "method": "supcon" if k == "all" else "scan", "run_dir": str(run_dir),
                               "command": run["command"], "steps": run["steps"], "epochs": schedule["epochs"],
                               "train_seconds": run["train_seconds"], "trained_now": run["trained_now"],
                               "scores": {key: scores[key] for key, _, _ in TASKS}, "details": _details(scores),
                               "transfer_seconds": scores["seconds"]})
        result["best_k"] = {key: max(result["runs"], key=lambda r: r["scores"][key])["k"] for key, _, _ in TASKS}
        result["total_seconds"] = time.perf_counter() - start
        _write_json(out / "results.json", result)
    chart = k_ablation_chart(result)
    chart.save(out / "k_ablation.png")
    result["chart"] = str(out / "k_ablation.png")
    result["total_seconds"] = time.perf_counter() - start
    _write_json(out / "results.json", result)
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


# ------------------------------------------------------------------------------------------- charts
def _font(size: int = 11):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _nice_step(span: float, target_ticks: int = 5) -> float:
    raw = max(span, 1e-9) / target_ticks
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


def transfer_chart(summary: dict, methods: Sequence[str], title: str = "") -> "Image.Image":
    """Grouped bars: one group per task, one bar per method (mean), whiskers +-1 std, value above each bar.

    One y axis in percent from min(0, lowest whisker) to max(100, highest whisker): bars start at 0.
    """
    from PIL import Image, ImageDraw

    bar, gap, group_gap, left, right, top, bottom, plot_h = 44, 4, 36, 56, 20, 64, 48, 300
    n_m = len(methods)
    group_w = n_m * bar + (n_m - 1) * gap
    font, small = _font(12), _font(10)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_w = sum(34 + probe.textlength(LABELS.get(m, m), font=small) for m in methods)
    width = int(max(left + len(TASKS) * group_w + (len(TASKS) + 1) * group_gap + right,
                    left + max(probe.textlength(title, font=font), legend_w) + right))
    height = top + plot_h + bottom
    lows, highs = [0.0], [100.0]
    for key, _, _ in TASKS:
        for c in summary.get(key, {}).values():
            lows.append(c["mean"] - (c["std"] or 0))
            highs.append(c["mean"] + (c["std"] or 0))
    step = _nice_step(max(highs) - min(lows))
    lo, hi = math.floor(min(lows) / step) * step, math.ceil(max(highs) / step) * step
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)

    def y(v: float) -> float:
        return top + plot_h * (hi - v) / (hi - lo)

    d.text((left, 8), title, fill="black", font=font)
    x = left  # legend
    for m in methods:
        d.rectangle((x, 30, x + 12, 42), fill=COLOURS.get(m, (0, 0, 0)))
        d.text((x + 16, 29), LABELS.get(m, m), fill="black", font=small)
        x += 16 + int(d.textlength(LABELS.get(m, m), font=small)) + 18
    v = lo
    while v <= hi + 1e-9:  # grid and y ticks
        d.line((left, y(v), width - right, y(v)), fill=(225, 225, 225) if v else (0, 0, 0))
        label = f"{v:g}"
        d.text((left - 6 - d.textlength(label, font=small), y(v) - 6), label, fill="black", font=small)
        v += step
    d.line((left, top, left, top + plot_h), fill="black")
    d.text((4, top - 14), "%", fill="black", font=small)
    for t, (key, task, metric) in enumerate(TASKS):
        gx = left + group_gap + t * (group_w + group_gap)
        for i, m in enumerate(methods):
            c = summary.get(key, {}).get(m)
            if not c:
                continue
            x0 = gx + i * (bar + gap)
            d.rectangle((x0, min(y(c["mean"]), y(0)), x0 + bar, max(y(c["mean"]), y(0))), fill=COLOURS.get(m, (0, 0, 0)))
            if c["std"] is not None:
                xc = x0 + bar / 2
                d.line((xc, y(c["mean"] - c["std"]), xc, y(c["mean"] + c["std"])), fill="black", width=1)
                for yy in (y(c["mean"] - c["std"]), y(c["mean"] + c["std"])):
                    d.line((xc - 5, yy, xc + 5, yy), fill="black")
            label = f"{c['mean']:.1f}"
            top_y = y(c["mean"] + (c["std"] or 0)) if c["mean"] >= 0 else y(0)
            d.text((x0 + (bar - d.textlength(label, font=small)) / 2, top_y - 13), label, fill="black", font=small)
        for j, line in enumerate((task, metric)):
            d.text((gx + (group_w - d.textlength(line, font=small)) / 2, top + plot_h + 8 + 13 * j), line,
                   fill="black", font=small)
    return img


def k_ablation_chart(result: dict) -> "Image.Image":
    """One panel per task: score against K (categorical axis, ``all`` last), MoCo (the start) dashed."""
    from PIL import Image, ImageDraw

    panel_w, panel_h, pad, left, top_title = 360, 230, 16, 50, 34
    cols, rows = 2, math.ceil(len(TASKS) / 2)
    width, height = cols * panel_w + pad, top_title + rows * panel_h + pad
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(12), _font(10)
    runs = result["runs"]
    moco = result.get("moco", {}).get("scores") or {}
    d.text((pad, 8), f"SCAN K ablation on the digit scenes (seed {result['seed']}, {result['budget']['steps']} steps "
                     f"each{', QUICK smoke run' if result.get('quick') else ''}); dashed: the MoCo start",
           fill="black", font=font)
    for t, (key, task, metric) in enumerate(TASKS):
        px, py = (t % cols) * panel_w + pad, top_title + (t // cols) * panel_h
        x0, x1, y0, y1 = px + left, px + panel_w - pad, py + 22, py + panel_h - 40
        values = [r["scores"][key] for r in runs] + ([moco[key]] if key in moco else [])
        vlo, vhi = min(values), max(values)
        span = max(vhi - vlo, 0.5)
        step = _nice_step(span, 4)
        lo, hi = math.floor((vlo - 0.1 * span) / step) * step, math.ceil((vhi + 0.25 * span) / step) * step

        def y(v: float) -> float:
            return y1 - (y1 - y0) * (v - lo) / (hi - lo)

        d.text((px + left, py + 4), f"{task}: {metric}", fill="black", font=font)
        v = lo
        while v <= hi + 1e-9:
            d.line((x0, y(v), x1, y(v)), fill=(225, 225, 225))
            label = f"{v:g}"
            d.text((x0 - 6 - d.textlength(label, font=small), y(v) - 6), label, fill="black", font=small)
            v += step
        d.rectangle((x0, y0, x1, y1), outline="black")
        n = len(runs)
        xs = [x0 + (x1 - x0) * (i + 0.5) / n for i in range(n)]
        if key in moco:
            yy, xx = y(moco[key]), x0
            while xx < x1:
                d.line((xx, yy, min(xx + 6, x1), yy), fill=(90, 90, 90))
                xx += 10
        pts = [(xs[i], y(r["scores"][key])) for i, r in enumerate(runs)]
        colour = TASK_COLOURS[t % len(TASK_COLOURS)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for (xx, yy), r in zip(pts, runs):
            d.ellipse((xx - 4, yy - 4, xx + 4, yy + 4), fill=colour)
            label = f"{r['scores'][key]:.1f}"
            d.text((xx - d.textlength(label, font=small) / 2, yy - 17), label, fill="black", font=small)
            d.text((xx - d.textlength(r["k"], font=small) / 2, y1 + 5), r["k"], fill="black", font=small)
        d.text(((x0 + x1) / 2 - 8, y1 + 19), "K", fill="black", font=small)
    return img


# --------------------------------------------------------------------------------------- README text
def _load(obj) -> Optional[dict]:
    if obj is None or isinstance(obj, dict):
        return obj
    return json.loads(Path(obj).read_text())


def readme_results_section(transfer_json, kablation_json=None) -> str:
    """A Markdown section of the measured results: Table 1 (mean +- std over seeds, best in bold), the
    winner of each task, and whether SCAN beats MoCo and the supervised baseline on it; then the K
    ablation if given. Arguments: the ``results.json`` objects (dicts) or their paths."""
    tr, ka = _load(transfer_json), _load(kablation_json)
    methods = tr["methods"]
    summary = tr.get("summary") or summarise(tr["runs"], methods)
    best = winners(summary)
    seeds = tr.get("seeds", [])
    out = ["## Transfer on the digit scenes (the paper's Table 1 in miniature)", ""]
    if tr.get("quick"):
        out += ["> **Smoke run (`--quick`): a few training steps per method; these numbers measure nothing.**", ""]
    recipes = ", ".join(f"`{Path(r['path']).name}`" for r in (tr.get("recipes") or {}).values())
    out += [f"Frozen backbones trained by `{tr.get('command') or 'scan-zoo bench transfer'}` "
            f"({len(seeds)} seed{'s' if len(seeds) != 1 else ''}: {', '.join(map(str, seeds))}"
            + (f"; recipes {recipes}" if recipes else "") + "), "
            "each scored by `scan_zoo.transfer.transfer_scores` on the val split: a linear probe (semantic), "
            "ridge regression of position, scale and colours (appearance, R^2 x 100), an MLP box head "
            "(localisation, mean IoU) and a linear multi-scale mask head (segmentation, mIoU). "
            "Cells: mean +- sample standard deviation over seeds; best mean in bold.", ""]
    out.append("| Task | Metric | " + " | ".join(LABELS.get(m, m) for m in methods) + " |")
    out.append("|---|---|" + "---:|" * len(methods))
    for key, task, metric in TASKS:
        cells = []
        for m in methods:
            c = summary.get(key, {}).get(m)
            text = fmt(c["mean"], c["std"]).replace("+-", "±") if c else "-"
            cells.append(f"**{text}**" if c and best.get(key) == m else text)
        out.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    out += ["", "Measured winner per task:", ""]
    for key, task, _ in TASKS:
        cells = summary.get(key, {})
        if not cells:
            continue
        w = best[key]
        line = f"- {task}: **{LABELS.get(w, w)}** ({fmt(cells[w]['mean'], cells[w]['std']).replace('+-', '±')})"
        others = sorted((c["mean"], m) for m, c in cells.items() if m != w)
        if others:
            runner_mean, runner = others[-1]
            margin = cells[w]["mean"] - runner_mean
            spread = max([s for s in (cells[w]["std"], cells[runner]["std"]) if s is not None], default=None)
            line += f", ahead of {LABELS.get(runner, runner)} by {margin:.2f}"
            if spread is not None and margin <= spread:
                line += " (within one standard deviation: not a clear win)"
            elif spread is None:
                line += " (one seed: no spread measured)"
        out.append(line + ".")
    if "scan" in methods:
        out.append("")
        refs = [m for m in ("moco", "supervised") if m in methods]
        for key, task, _ in TASKS:
            cells = summary.get(key, {})
            if "scan" not in cells or not refs:
                continue
            scan = cells["scan"]["mean"]
            ref_text = " and ".join(f"{LABELS[m]} {cells[m]['mean']:.2f}" for m in refs if m in cells)
            beaten = [m for m in refs if m in cells and scan <= cells[m]["mean"]]
            names = " and ".join(LABELS[m] for m in refs)
            if beaten:
                higher = " and ".join(f"{LABELS[m]} scores {cells[m]['mean']:.2f}" for m in beaten)
                rest = [f"{LABELS[m]} {cells[m]['mean']:.2f}" for m in refs if m in cells and m not in beaten]
                both = "both " if len([m for m in refs if m in cells]) > 1 else ""
                out.append(f"- On {task}, SCAN ({scan:.2f}) does not beat {both}{names}: {higher}"
                           + (f" ({', '.join(rest)})" if rest else "") + ".")
            else:
                out.append(f"- On {task}, SCAN ({scan:.2f}) beats {names} ({ref_text}).")
    if "dsc" in methods and "moco" in methods:
        out += ["", "DSC is MoCo-v2 plus a pixel and a pixel-category term, label-free, at the same budget:", ""]
        for key, task, _ in TASKS:
            cells = summary.get(key, {})
            if "dsc" in cells and "moco" in cells:
                dsc, moco = cells["dsc"]["mean"], cells["moco"]["mean"]
                spread = max([s for s in (cells["dsc"]["std"], cells["moco"]["std"]) if s is not None], default=None)
                caveat = ""
                if spread is not None and abs(dsc - moco) <= spread:
                    caveat = " (within one standard deviation: not a clear difference)"
                out.append(f"- On {task}, DSC ({dsc:.2f}) {'beats' if dsc > moco else 'does not beat'} "
                           f"MoCo-v2 ({moco:.2f}){caveat}.")
    if ka:
        out += ["", "### SCAN's K ablation (the paper's Fig. 3 in miniature)", ""]
        if ka.get("quick"):
            out += ["> **Smoke run (`--quick`): these numbers measure nothing.**", ""]
        out += [f"One seed ({ka['seed']}), every arm initialised from the same MoCo run and trained for the same "
                f"{ka['budget']['steps']} steps of {ka['budget']['images_per_step']} images. K = 0: SCAN's loss with "
                "the anchor's own view as its only positive (in-batch negatives kept); K = all: every same-class "
                "image a positive (the supcon method with SCAN's schedule).", ""]
        out.append("| K | " + " | ".join(f"{task} {metric}" for _, task, metric in TASKS) + " |")
        out.append("|---|" + "---:|" * len(TASKS))
        best_k = ka.get("best_k", {})
        for r in ka["runs"]:
            cells = [(f"**{r['scores'][key]:.2f}**" if best_k.get(key) == r["k"] else f"{r['scores'][key]:.2f}")
                     for key, _, _ in TASKS]
            out.append(f"| {r['k']} | " + " | ".join(cells) + " |")
        if ka.get("moco", {}).get("scores"):
            out.append("| MoCo (start) | " + " | ".join(f"{ka['moco']['scores'][key]:.2f}" for key, _, _ in TASKS) + " |")
        out += ["", "Best K per task (one seed): " + "; ".join(f"{task} K = {best_k[key]}" for key, task, _ in TASKS
                                                             if key in best_k) + "."]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    """Register ``scan-zoo bench transfer`` and ``scan-zoo bench k-ablation`` on the CLI's sub-parsers."""
    p = subparsers.add_parser("bench", help="benchmarks on the digit scenes: transfer suite (Table 1), K ablation (Fig. 3)")
    sub = p.add_subparsers(dest="bench", required=True)
    t = sub.add_parser("transfer", help="train every method for every seed, score the transfer suite, table + chart")
    t.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods (default: all five)")
    t.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training and head seeds (default 0 1 2)")
    t.add_argument("--out", default="runs/bench/transfer", help="run directories, results.json, transfer.png")
    t.add_argument("--merge", default=None, metavar="RESULTS_JSON",
                   help="add --methods to this finished results.json (its other methods kept, not retrained); "
                        "the merged result goes to OUT")
    _common(t)
    t.set_defaults(func=_cmd_transfer)
    k = sub.add_parser("k-ablation", help="SCAN at several K from one MoCo run, equal budgets; scores + line plot")
    k.add_argument("--ks", nargs="+", default=["0", "1", "2", "4", "8", "all"],
                   help="values of K; 'all' = every same-class image (supcon with SCAN's schedule)")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--out", default="runs/bench/k_ablation", help="run directories, results.json, k_ablation.png")
    k.add_argument("--moco-run", default=None, help="a finished MoCo run to start from (default: train one from "
                   "digits_moco.yaml into OUT/seed<seed>/moco)")
    _common(k)
    k.set_defaults(func=_cmd_k_ablation)


def _common(p) -> None:
    p.add_argument("--recipes-dir", default="configs", help="folder of digits_<method>.yaml (default configs)")
    p.add_argument("--quick", action="store_true", help=f"smoke test: one seed, {QUICK_STEPS} steps per run, tiny heads")
    p.add_argument("--data-cache", default=None, help="where 'digits' is rendered (default ~/.cache/scan_zoo/digits)")
    p.add_argument("--num-workers", type=int, default=2)


def _logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("scan_zoo").setLevel(logging.INFO)


def _command(args, name: str, flags: dict) -> str:
    parts = ["scan-zoo", "bench", name]
    for flag, value in flags.items():
        if value is None or value is False:
            continue
        parts.append(flag if value is True else f"{flag} " + (" ".join(map(str, value)) if isinstance(value, list)
                                                              else str(value)))
    return " ".join(parts)


def _cmd_transfer(args) -> int:
    _logging()
    command = _command(args, "transfer", {"--methods": args.methods, "--seeds": args.seeds, "--out": args.out,
                                          "--recipes-dir": args.recipes_dir, "--quick": args.quick,
                                          "--data-cache": args.data_cache, "--merge": args.merge})
    result = run_transfer_bench(args.methods, args.seeds, args.out, args.recipes_dir, args.quick, args.data_cache,
                                args.num_workers, command, merge=args.merge)
    print(f"\nTransfer on the digit scenes ({len(result['seeds'])} seed(s){', QUICK' if result['quick'] else ''}); "
          "mean +- std over seeds, * = best:")
    print(format_table(result["summary"], result["methods"]))
    print(f"\nresults: {Path(args.out) / 'results.json'}; chart: {result['chart']} "
          f"({result['total_seconds']:.0f} s)")
    return 0


def _cmd_k_ablation(args) -> int:
    _logging()
    command = _command(args, "k-ablation", {"--ks": args.ks, "--seed": args.seed, "--out": args.out,
                                            "--moco-run": args.moco_run, "--recipes-dir": args.recipes_dir,
                                            "--quick": args.quick, "--data-cache": args.data_cache})
    result = run_k_ablation(args.ks, args.seed, args.out, args.recipes_dir, args.moco_run, args.quick,
                            args.data_cache, args.num_workers, command)
    print(f"\nSCAN K ablation (seed {result['seed']}, {result['budget']['steps']} steps per K"
          f"{', QUICK' if result['quick'] else ''}):")
    print(format_k_table(result))
    print(f"\nresults: {Path(args.out) / 'results.json'}; chart: {result['chart']} ({result['total_seconds']:.0f} s)")
    return 0
