"""The Markdown results section (docs/results.md) written from the benchmarks' ``results.json`` files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .bench_runs import LABELS, fmt, summarise, winners
from .transfer import TASKS


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
