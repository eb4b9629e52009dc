"""Checkpoint folders on disk, without Accelerate: which ones are complete and uncorrupted, which one a
resume continues from, moving a resumed line's newer checkpoints aside, and cleaning what a killed run
left. The trainer (:mod:`scan_zoo.train.trainer`) writes them; see its docstring for the layout and for
why a kill at any instruction leaves a usable run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from scan_zoo.common.errors import UserError
from scan_zoo.common.files import sha256_file
from scan_zoo.train.config import TrainConfig

logger = logging.getLogger("scan_zoo.train.trainer")  # the run's checkpoint messages under one name

CKPT_DIR = "checkpoints"
ABANDONED_DIR = "abandoned_checkpoints"  # newer checkpoints of a line a resume from further back left
STATE_FILE = "train_state.json"


def checkpoint_problem(path: Path, verify: bool = False) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is one.

    Complete: ``train_state.json`` parses, and every file it lists is there with the size recorded
    (checkpoints written before that list existed are taken on their ``train_state.json`` alone). With
    ``verify``, each file's content must also match the sha256 recorded for it: a checkpoint whose bytes
    changed after it was written is corrupt, and never resumed from.
    """
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        int(state["step"])
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{STATE_FILE} is unreadable ({type(e).__name__}: {e})"
    for name, size in state.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes instead of {size}"
    if verify:
        for name, digest in state.get("sha256", {}).items():
            try:
                ok = sha256_file(path / name) == digest
            except OSError as e:
                return f"{name} cannot be read ({e.strerror or e})"
            if not ok:
                return f"{name} does not match the sha256 recorded when it was written (the checkpoint is corrupt)"
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (by the step recorded inside, not by folder name).

    Incomplete ones (:func:`checkpoint_problem`) are left out, with a warning.
    """
    found = []
    for d in (Path(run_dir) / CKPT_DIR).glob("step_*"):
        if not d.is_dir():
            continue
        problem = checkpoint_problem(d)
        if problem:
            logger.warning("ignoring incomplete checkpoint %s: %s", d, problem)
            continue
        found.append((json.loads((d / STATE_FILE).read_text())["step"], d))
    return [d for _, d in sorted(found)]


def remove_leftovers(run_dir: Path) -> None:
    """Delete what a killed run left in ``checkpoints/``: unfinished ``.tmp_*`` and half-pruned ``.trash_*`` folders."""
    root = Path(run_dir) / CKPT_DIR
    for d in sorted(root.glob(".tmp_step_*")) + sorted(root.glob(".trash_step_*")):
        logger.info("removing %s, left by an interrupted run", d)
        shutil.rmtree(d, ignore_errors=True)


def _folder_step(path: Path) -> int | None:
    try:
        return int(path.name[len("step_") :])
    except ValueError:
        return None


def abandon_newer(run_dir: Path, step: int) -> Path | None:
    """Move the checkpoints of steps after ``step`` to ``<run>/abandoned_checkpoints/<time>/`` (kept, not deleted),
    so that ``latest`` means the line being continued. Returns where they went (None: there were none)."""
    newer = sorted(d for d in (Path(run_dir) / CKPT_DIR).glob("step_*") if d.is_dir() and (_folder_step(d) or 0) > step)
    if not newer:
        return None
    base = Path(run_dir) / ABANDONED_DIR / time.strftime("%Y%m%d-%H%M%S")
    dest, n = base, 1
    while dest.exists():
        dest, n = base.with_name(f"{base.name}-{n}"), n + 1
    dest.mkdir(parents=True)
    for d in newer:
        os.replace(d, dest / d.name)
    fsync(dest)
    fsync(Path(run_dir) / CKPT_DIR)
    return dest


def discard(path: Path) -> None:
    """Delete a checkpoint folder: renamed out of ``step_*`` first (atomic), so it never looks complete half-deleted."""
    trash = path.with_name(".trash_" + path.name)
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (a kill alone loses nothing; a power cut would)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def last_good(run_dir: Path) -> str:
    """The newest checkpoint whose content matches its recorded hashes (a corrupt one never counts), as the
    text an error line names."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(ckpt, verify=True)
        if problem is None:
            return str(ckpt)
        logger.warning("checkpoint %s is corrupt: %s", ckpt, problem)
    return f"none yet (in {Path(run_dir) / CKPT_DIR})"


def resolve_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
    if cfg.resume in (None, "", "none"):
        if list_checkpoints(run_dir):
            raise UserError(
                f"{run_dir} already holds checkpoints: pass --resume latest to continue that run, "
                "or choose another --output-dir"
            )
        return None
    if cfg.resume == "latest":
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            logger.info("no checkpoint in %s yet: starting from the beginning", run_dir)
            return None
        problem = checkpoint_problem(ckpts[-1], verify=True)
        if problem:
            older = f"--resume {ckpts[-2]}" if len(ckpts) > 1 else "a new --output-dir"
            raise UserError(
                f"the newest checkpoint {ckpts[-1]} is corrupt: {problem}; no older one is taken in its "
                f"place silently: continue from the one before with {older}"
            )
        return ckpts[-1]
    path = Path(cfg.resume)
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(f"not a complete checkpoint directory: {path} ({problem})")
    problem = checkpoint_problem(path, verify=True)
    if problem:
        raise UserError(f"checkpoint {path} is corrupt: {problem}")
    return path
