"""A run's identity: what a checkpoint must share with the run that resumes it.

A checkpoint records the config that produced it (``config.yaml``) and a fingerprint of its training data
(:func:`data_fingerprint`, in ``train_state.json``). ``--resume`` compares both with the new run: a field
that changes the run's maths (method, model, lr, schedule, batch, queue, K, augmentation, seed, data) must
be the same, or be named in ``--resume-override``; fields that cannot change the result (:data:`NEUTRAL`:
workers, logging, checkpoint cadence, paths) may differ. Fields that size the checkpoint's tensors
(:data:`STRUCTURAL`) cannot be overridden at all: those runs cannot continue each other.

Checkpoints record each of their files' sha256 (:func:`scan_zoo.common.files.sha256_file`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from scan_zoo.common.errors import UserError
from scan_zoo.data.digits import DONE_FILE
from scan_zoo.train.config import TrainConfig

# Fields that cannot change the trained weights: how fast, where and how often things are written, and
# paths whose content is fingerprinted instead (the data tree, the neighbour table, the weights a SCAN run
# starts from, which a resumed run replaces by the checkpoint's anyway).
NEUTRAL = frozenset(
    {
        "output_dir",
        "data",
        "data_cache",
        "neighbors",
        "appearance_model",
        "init_from",
        "num_workers",
        "log_every_steps",
        "save_every_epochs",
        "save_every_steps",
        "keep_checkpoints",
        "stop_after_steps",
        "preempt_signals",
        "time_limit",
        "time_limit_margin",
        "resume",
        "resume_override",
        "strict_data",
        "skip_nonfinite",
        "deterministic",
        "knn_k",
        "knn_temperature",
        "dist_timeout",
    }
)

# Fields that decide which tensors a checkpoint holds, and their shapes: no override can make it fit.
STRUCTURAL = frozenset(
    {
        "method",
        "model",
        "proj_dim",
        "queue_size",
        "dsc_dense_dim",
        "dsc_queue_size",
        "dsc_assign",
        "dsc_clusters",
        "dsc_feature_layer",
    }
)

DATA = "data"  # the name --resume-override takes for a changed training set


def identity_fields() -> list[str]:
    """Every TrainConfig field that is part of a run's identity, in declaration order."""
    return [f.name for f in fields(TrainConfig) if f.name not in NEUTRAL]


def data_fingerprint(train_base, data_root: Path, neighbors=None) -> dict:
    """What identifies the training data without reading its pixels.

    The number of images and classes, a sha256 over the sorted relative file list with each file's label
    and size, the render parameters when it is the embedded digit scenes, and for SCAN a sha256 of the
    neighbour table (the positives are part of the data a SCAN run sees).
    """
    rows = []
    for path, label in train_base.samples:
        try:
            size = os.stat(path).st_size
        except OSError:
            size = -1  # unreadable now; still a row, so a file that comes back changes the fingerprint
        rows.append(f"{Path(path).relative_to(train_base.root).as_posix()}\t{label}\t{size}\n")
    h = hashlib.sha256()
    for row in sorted(rows):
        h.update(row.encode("utf-8", "surrogateescape"))
    fp = {"num_images": len(rows), "num_classes": len(train_base.classes), "files": h.hexdigest()}
    done = Path(data_root) / DONE_FILE
    if done.is_file():
        try:
            info = json.loads(done.read_text())
            fp["render"] = {k: info.get(k) for k in ("format_version", "renders", "size", "val_fraction", "seed")}
        except (OSError, ValueError, AttributeError):
            pass
    if neighbors is not None:
        t = neighbors.detach().to("cpu").contiguous()
        fp["neighbors"] = hashlib.sha256(str(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()
    return fp


def _show(value: Any) -> str:
    return "unset" if value is None else repr(value) if isinstance(value, str) else str(value)


def config_differences(saved: dict, cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """``(field, old, new)`` for each identity field whose value differs (a field the old run's config lacks
    had its default then)."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    new = cfg.to_dict()
    out = []
    for name in identity_fields():
        old = saved.get(name, defaults.get(name))
        if old != new[name]:
            out.append((name, old, new[name]))
    return out


def data_difference(saved: dict | None, now: dict) -> str | None:
    """How the training data differs from the checkpoint's (None: the same, or an old checkpoint without a
    fingerprint, which cannot tell)."""
    if not saved:
        return None
    parts = []
    for key, what in (("num_images", "images"), ("num_classes", "classes")):
        if saved.get(key) != now.get(key):
            parts.append(f"{saved.get(key)} -> {now.get(key)} {what}")
    if saved.get("render") != now.get("render"):
        parts.append(f"digit scenes rendered with {saved.get('render')} -> {now.get('render')}")
    if saved.get("neighbors") != now.get("neighbors"):
        parts.append("another neighbour table")
    if not parts and saved.get("files") != now.get("files"):
        parts.append("other file names, labels or sizes")
    return ", ".join(parts) or None


def parse_override(value: str | None) -> set[str]:
    """``--resume-override lr,epochs`` as a set of field names (``data`` for the training set), checked."""
    if not value:
        return set()
    names = {n.strip() for n in str(value).split(",") if n.strip()}
    known = {f.name for f in fields(TrainConfig)} | {DATA}
    unknown = sorted(names - known)
    if unknown:
        raise UserError(
            f"--resume-override names unknown option(s): {', '.join(unknown)} "
            "(give config field names, e.g. lr,epochs, or 'data' for a changed training set)"
        )
    return names


def check_resume(
    ckpt: Path, saved_cfg: dict, saved_data: dict | None, cfg: TrainConfig, data_now: dict
) -> list[tuple[str, Any, Any]]:
    """Refuse (one ``UserError`` line naming each differing field, old -> new) to continue a checkpoint
    made by a different run, unless each difference is named in ``cfg.resume_override``.

    Returns the overridden differences (``(field, old, new)``; the data as ``("data", old, new)``), which
    the caller applies and logs.
    """
    allowed = parse_override(cfg.resume_override)
    diffs = config_differences(saved_cfg, cfg)
    data_diff = data_difference(saved_data, data_now)
    structural = [d for d in diffs if d[0] in STRUCTURAL]
    if structural:
        text = ", ".join(f"{n} {_show(o)} -> {_show(v)}" for n, o, v in structural)
        raise UserError(
            f"cannot resume {ckpt}: it belongs to another kind of run ({text}), whose tensors do not "
            "fit this one; no --resume-override can change that: start a new run in another --output-dir"
        )
    refused = [d for d in diffs if d[0] not in allowed]
    if data_diff and DATA not in allowed:
        refused.append((DATA, None, None))
    if refused:
        text = ", ".join(f"data ({data_diff})" if n == DATA else f"{n} {_show(o)} -> {_show(v)}" for n, o, v in refused)
        names = ",".join(sorted({n for n, _, _ in refused} | (allowed & {n for n, _, _ in diffs})))
        raise UserError(
            f"cannot resume {ckpt}: this run differs from the one that wrote it: {text}; "
            f"pass --resume-override {names} to continue it with the new values, or choose another "
            "--output-dir for a new run"
        )
    applied = [d for d in diffs if d[0] in allowed]
    if data_diff:
        applied.append((DATA, saved_data, data_now))
    return applied
