"""Generated text: model cards and the README's zoo table, from the registry and the evaluation results.

Nothing here is typed by hand: a number shown is either read from ``eval_results.json`` (measured by
``eval_linear.py``, with its protocol) or from an entry's ``reported`` field (a paper's number, labelled so).
"""

from __future__ import annotations

import math

from scan_zoo.zoo.registry import ENTRIES, METHOD_NAMES, PAPERS, ZooEntry

WHICH_SCAN = (
    "scan_zoo's SCAN is **Supervised Contrastive Adjustment in Neighborhood** (Wei et al., 2020): MoCo-v2 "
    "contrastive pretraining in which each image's positives are the images of its own class that are "
    'also among its K nearest neighbours in a label-free feature space. It is **not** "SCAN: Learning '
    'to Classify Images without Labels" (Van Gansbeke et al., 2020), the clustering method with the '
    "same acronym."
)


def _protocol_text(p: dict) -> str:
    """The settings a reader needs to reproduce a number: schedule, then the train and val transforms."""
    keys = ("name", "epochs", "lr", "batch_size", "milestones")
    text = [f"{k} {p[k]}" for k in keys if k in p]
    text += [f"{label}: {p[k]}" for label, k in (("train", "train_transform"), ("val", "eval_transform")) if k in p]
    return ", ".join(text)


def headline(results: dict) -> tuple[str, str]:
    """(linear top-1 with its protocol, kNN top-1) as text, '-' where not measured."""
    linear = "-"
    for proto in ("moco", "cached"):
        r = results.get(proto)
        if r and "top1" in r:
            linear = f"{r['top1']:.1f} ({proto})"
            break
    knn = "-"
    for r in results.values():
        if isinstance(r, dict) and isinstance(r.get("knn"), dict) and "top1" in r["knn"]:
            knn = f"{r['knn']['top1']:.1f}"
            break
    return linear, knn


def metrics_summary(entry: ZooEntry) -> str:
    """One line for listings and docstrings: measured numbers, else the paper's, else 'not trained'."""
    if entry.metrics:
        linear, knn = headline(entry.metrics)
        return f"linear top-1 {linear}, kNN top-1 {knn} on {entry.data.split(' (')[0]} val"
    if entry.reported:
        r = entry.reported
        return f"linear top-1 {r['linear_top1']} reported by the paper (not reproduced here)"
    return "no weights yet"


def results_table(results: dict) -> str:
    if not results:
        return "Not evaluated yet: run `eval_linear.py` on this model to measure it.\n"
    lines = [
        "| protocol | top-1 | top-5 | kNN top-1 (k=20, T=0.07) | data (train / val images) | settings |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if not isinstance(r, dict) or "top1" not in r:
            continue
        knn = r.get("knn", {})
        lines.append(
            f"| {name} | {r['top1']:.2f} | {r.get('top5', float('nan')):.2f} | "
            f"{knn.get('top1', float('nan')):.2f} | {r.get('dataset', '?')} ({r.get('train_images', '?')} / "
            f"{r.get('val_images', '?')}) | {_protocol_text(r.get('protocol', {}))} |"
        )
    return (
        "\n".join(lines) + "\n\nTop-1/top-5 are the last epoch's (never the best epoch's).\n" + reproduce_text(results)
    )


def reproduce_text(results: dict) -> str:
    """The command that re-measures the numbers and how close a re-run comes, from ``eval_results.json``."""
    lines = []
    for r in results.values():
        rep = r.get("reproduce") if isinstance(r, dict) else None
        if rep:
            lines.append(
                f"\nReproduce: `{rep['command']}` prints these numbers: kNN exactly, linear top-1 within "
                f"{rep['linear_top1_tolerance']:.2f} points; {rep['note']}.\n"
            )
    return "".join(dict.fromkeys(lines))


def model_card(entry: ZooEntry, results: dict, sha256: str, train: dict) -> str:
    """The README.md of an exported / published model."""
    title, arxiv, bibtex = entry.paper
    repo = entry.facts.get("hf_hub_id") or entry.hf_hub_id or f"ORG/{entry.name}"
    steps = (
        f"{train.get('steps', '?')} steps ({train.get('epochs', '?')} epochs) on {train.get('num_train_images', '?')} images"
        if train
        else "see the recipe"
    )
    reported = ""
    if entry.reported:
        r = entry.reported
        reported = (
            f"\nThe paper reports linear top-1 {r['linear_top1']} for this recipe ({r['source']}). "
            "That is the paper's number, not a measurement of these weights.\n"
        )
    return f"""---
library_name: timm
license: {entry.license}
tags:
- image-feature-extraction
- timm
- scan_zoo
- {entry.method}
---
# {entry.name}

A {entry.arch} backbone pretrained with **{METHOD_NAMES[entry.method]}** by
scan_zoo{"" if entry.method == "scan" else " (this model is not SCAN: it is one of the methods SCAN is compared with)"}.
Backbone only: pooled features, no classifier.

{WHICH_SCAN}

## Model details
- **Architecture:** timm `{entry.arch}`, `num_classes=0` (`num_classes=N` adds a new classifier).
- **Method:** {METHOD_NAMES[entry.method]} - {title} ({arxiv}).
- **Training data:** {entry.data}.
- **Training:** `{entry.recipe_command}`; {steps}.
- **Preprocessing:** resize to {math.floor(entry.preprocess.image_size / entry.preprocess.crop_pct)} px, \
{entry.preprocess.image_size} px centre crop (crop_pct {entry.preprocess.crop_pct:.4f}),
  {entry.preprocess.interpolation}, mean {tuple(entry.preprocess.mean)}, std {tuple(entry.preprocess.std)}.
- **Weights:** `model.safetensors`, sha256 `{sha256}`.
{("- **Notes:** " + entry.notes) if entry.notes else ""}

## Results
{results_table(results)}{reported}
## Usage
```python
import scan_zoo, timm   # importing scan_zoo registers the zoo's tags and verifies the weights' sha256
model = timm.create_model("{entry.name}", pretrained=True).eval()
# or, plain timm without scan_zoo:
model = timm.create_model("hf-hub:{repo}", pretrained=True)
cfg = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**cfg)
features = model(transform(image).unsqueeze(0))          # [1, num_features]
# multi-scale feature maps for detection / segmentation:
fmaps = timm.create_model("{entry.name}", pretrained=True, features_only=True)
# torch.hub, from a scan_zoo checkout:
model = torch.hub.load("path/to/scan_zoo", "create_model", "{entry.name}", source="local")
```

## Citation
```bibtex
{bibtex}
```

This card was generated by `scan-zoo export` from the zoo registry and `eval_results.json`.
"""


def zoo_table() -> str:
    """The README's zoo table (between the zoo-table markers)."""
    lines = [
        "| name | method | data | weights | linear top-1 (protocol) | kNN top-1 | recipe |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in ENTRIES:
        if e.metrics:
            linear, knn = headline(e.metrics)
        elif e.reported:
            linear, knn = f"{e.reported['linear_top1']} (paper)", "-"
        else:
            linear, knn = "-", "-"
        where = {
            "shipped": "in the package",
            "published": f"Hub `{e.facts.get('hf_hub_id')}`",
            "recipe": "not yet trained",
        }[e.status]
        data = e.data.split(" (")[0]
        extra = "".join(f" `--{k.replace('_', '-')} {v}`" for k, v in e.overrides)
        lines.append(
            f"| `{e.name}` | {METHOD_NAMES[e.method]} | {data} | {where} | {linear} | {knn} | `{e.recipe}`{extra} |"
        )
    reps = [r["reproduce"] for e in ENTRIES for r in e.metrics.values() if isinstance(r, dict) and "reproduce" in r]
    if reps:
        tol = max(r["linear_top1_tolerance"] for r in reps)
        lines += [
            "",
            f"Measured numbers: `python eval_linear.py NAME` re-measures each, and the card prints the "
            f"command: kNN exactly, linear top-1 within {tol:.2f} points; {reps[0]['note']}.",
        ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- a user's own run
def _data_text(data: dict, num_train_images) -> str:
    fp = data.get("fingerprint") or {}
    where = (
        "the embedded digit scenes (`--data digits`: scikit-learn's handwritten digits rendered as scenes)"
        if data["kind"] == "digits"
        else f"the ImageFolder `{data['value']}` (its train/ split)"
    )
    counts = f"{fp.get('num_images', num_train_images)} training images"
    if fp.get("num_classes") is not None:
        counts += f", {fp['num_classes']} classes"
    digest = (
        (
            f"; fingerprint (sha256 of the sorted file list with labels and sizes, recorded by the final "
            f"checkpoint) `{fp['files']}`"
        )
        if fp.get("files")
        else "; no checkpoint fingerprint was found"
    )
    return f"{where}; {counts}{digest}"


def _recipe_text(recipe: dict) -> str:
    diffs = recipe["differences"]
    listed = ", ".join(f"`{k}` {v!r} ({'recipe' if recipe['path'] else 'default'}: {r!r})" for k, v, r in diffs)
    tail = f"except {listed}" if diffs else "with no value changed"
    if recipe["path"] is None:
        return f"{recipe['how']}, {tail}"
    return f"`{recipe['path']}` ({recipe['how']}), {tail}"


def run_card(f: dict) -> str:
    """The README.md of a user's own run exported under ``ORG/MODEL`` (facts gathered by
    :mod:`scan_zoo.experiments.user_export`): every statement is one of those facts."""
    method = METHOD_NAMES.get(f["method"], f["method"])
    title, arxiv, _ = PAPERS[f["method"]] if f["method"] in PAPERS else ("", "", "")
    p = f["preprocess"]
    starts = "".join(f"\n- **{k.replace('_', ' ')}:** `{v}`" for k, v in f["starts"].items())
    if f["results"]:
        commands = "\n".join(f"- `{k}`: `{c}`" for k, c in f["eval_commands"].items())
        results = (
            f"Measured by `eval_linear.py` on these weights (their sha256 recorded in `eval_results.json`):\n\n"
            f"{results_table(f['results'])}\nTo measure them again (or with the exported folder in place of "
            f"`hf-hub:{f['name']}`):\n{commands}\n"
        )
    else:
        results = (
            "No number was measured on these weights (the run holds no `eval_results.json` for them). "
            f"Measure them with `{f['measure_command']}`.\n"
        )
    if f["dropped"]:
        results += (
            f"\nLeft out: the run's results {f['dropped']} were not measured on these weights "
            "(their `weights_sha256` differs or is missing).\n"
        )
    not_scan = (
        "" if f["method"] == "scan" else " (this model is not SCAN: it is one of the methods SCAN is compared with)"
    )
    return f"""---
library_name: timm
tags:
- image-feature-extraction
- timm
- scan_zoo
- {f["method"]}
---
# {f["name"]}

A timm `{f["arch"]}` backbone trained with **{method}**{not_scan} by `train.py` of scan_zoo, exported by
`scan-zoo export`. Backbone only: pooled features, no classifier. This model is not part of the scan_zoo
registry; it describes one training run.

{WHICH_SCAN}

## Model details
- **Architecture:** timm `{f["arch"]}`, `num_classes=0`.
- **Method:** {method}{f" - {title} ({arxiv})" if title else ""}.
- **Training data:** {_data_text(f["data"], f["num_train_images"])}.
- **Training:** {f["steps"]} optimiser steps ({f["epochs"]} full epochs).
- **Recipe:** {_recipe_text(f["recipe"])}.
- **A command with the same settings:** `{f["train_command"]}`.{starts}
- **Preprocessing** (config.json, from {p["source"]}): Resize({p["eval_resize"]}) + CenterCrop({p["input_size"][-1]}),
  i.e. crop_pct {p["crop_pct"]:.4f}, {p["interpolation"]}, mean {tuple(p["mean"])}, std {tuple(p["std"])}.
- **Weights:** `model.safetensors`, sha256 `{f["sha256"]}`.

## Results
{results}
## Usage
```python
import timm
model = timm.create_model("hf-hub:{f["name"]}", pretrained=True).eval()
cfg = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**cfg)   # the evaluation transform above
features = model(transform(image).unsqueeze(0))  # [1, num_features]
```

This card was generated by `scan-zoo export` from the run's config.json, config.yaml, final checkpoint and
eval_results.json.
"""
