"""Reading and writing a checkpoint's own files, and checking it against the run that resumes it; no
Accelerate here (the model, optimizer and RNG files are Accelerate's ``save_state``/``load_state``, called by
:meth:`scan_zoo.train.trainer.Trainer.save_checkpoint` and ``load_checkpoint``).

Beside what ``save_state`` writes, a checkpoint holds ``config.yaml`` and, written last (it marks the
checkpoint complete), ``train_state.json``: the position (epoch, step, step in the epoch, skipped non-finite
steps), the scheduler state, the data fingerprint, and the size and sha256 of every other file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from scan_zoo.common.errors import UserError
from scan_zoo.common.files import sha256_file
from scan_zoo.train import identity
from scan_zoo.train.checkpoints import STATE_FILE, fsync
from scan_zoo.train.config import TrainConfig

logger = logging.getLogger("scan_zoo.train.trainer")  # the run's checkpoint messages under one name


def write_checkpoint_files(tmp: Path, cfg: TrainConfig, state: dict, on_config_written: Callable[[], None]) -> None:
    """The config, then ``train_state.json`` (``state`` plus the size and sha256 of every other file of ``tmp``),
    every file flushed to disk. ``on_config_written`` runs between the two (the ``checkpoint_written`` event)."""
    cfg.save(tmp / "config.yaml")
    on_config_written()
    names = [f.relative_to(tmp).as_posix() for f in sorted(tmp.rglob("*")) if f.is_file()]
    files = {name: (tmp / name).stat().st_size for name in names}
    for name in names:
        fsync(tmp / name)
    row = {**state, "files": files, "sha256": {name: sha256_file(tmp / name) for name in names}}
    (tmp / STATE_FILE).write_text(json.dumps(row, indent=1))
    fsync(tmp / STATE_FILE)
    fsync(tmp)


def read_train_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


@contextlib.contextmanager
def writing(
    tmp: Path,
    final: Path,
    last_good: Callable[[], str],
    passes: tuple[type, ...] = (),
    passes_if: Callable[[BaseException], object] = lambda e: None,
):
    """A write error (a full disk, a quota, a failing device) while making a checkpoint: the unfinished
    ``tmp`` is removed and the run ends with one line; the last good checkpoint is untouched. Exceptions of
    the ``passes`` types, and those for which ``passes_if`` is not None (a lost peer process: not a write
    error, train.py reports it), go through as they are."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, passes) or passes_if(e) is not None:
            raise
        write_failed(tmp, final, e, last_good())
    except Exception as e:
        if type(e).__name__ != "SafetensorError":  # safetensors' own error type for a failed write
            raise
        write_failed(tmp, final, e, last_good())


def write_failed(tmp: Path, final: Path, e: Exception, last_good: str) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    lines = str(getattr(e, "strerror", None) or e).strip().splitlines() or [type(e).__name__]
    raise UserError(
        f"could not write checkpoint {final.name} in {final.parent}: {lines[0][:300]}; the last good "
        f"checkpoint, {last_good}, is unchanged (make room, then continue with "
        "--resume latest)"
    ) from None


def check_identity(path: Path, saved: dict, cfg: TrainConfig, fingerprint: dict) -> list:
    """The checkpoint's config and data against this run's (:func:`scan_zoo.train.identity.check_resume`)."""
    try:
        saved_cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except FileNotFoundError:
        saved_cfg = None
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"checkpoint {path} has an unreadable config.yaml ({type(e).__name__})") from None
    if saved_cfg is None:
        logger.warning("checkpoint %s records no config: its run's identity cannot be checked", path)
        return []
    if not isinstance(saved_cfg, dict):
        raise UserError(f"checkpoint {path} has a config.yaml that is not a mapping")
    if "data" not in saved:
        logger.warning(
            "checkpoint %s records no data fingerprint (written by an older version): the training "
            "data cannot be compared",
            path,
        )
    return identity.check_resume(path, saved_cfg, saved.get("data"), cfg, fingerprint)


def check_schedule(path: Path, saved: dict, steps_per_epoch: int, total_steps: int, overridden: bool) -> None:
    """The checkpoint's epoch length must be this run's (same data, batch size and process count); a changed
    schedule length is said (unless ``--resume-override`` rebuilds the schedule anyway)."""
    if saved.get("steps_per_epoch") != steps_per_epoch:
        raise UserError(
            f"checkpoint {path} was made with {saved.get('steps_per_epoch')} steps per epoch, "
            f"this run has {steps_per_epoch}: same data, batch size and process count needed"
        )
    if not overridden and saved.get("total_steps") != total_steps:
        logger.warning(
            "checkpoint %s was made for a %s-step schedule; this run has %d steps (--epochs/--max-steps"
            " changed): the cosine schedule changes from here",
            path,
            saved.get("total_steps"),
            total_steps,
        )


def apply_override(
    cfg: TrainConfig, optimizer, scheduler, path: Path, applied: list, metrics: Path | None, step: int
) -> None:
    """Continue with the new values: optimiser hyper-parameters and the lr schedule are rebuilt from this
    run's config (the checkpoint's optimizer and scheduler state carry the old ones), and the change is
    recorded in ``metrics`` (``metrics.jsonl``; None on the processes that do not write it)."""
    groups = optimizer.param_groups
    for g in groups:
        g.update(initial_lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
    scheduler.base_lrs = [cfg.lr for _ in groups]
    now = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for g, lr in zip(groups, now):
        g["lr"] = lr
    scheduler._last_lr = now
    changes = {name: {"old": old, "new": new} for name, old, new in applied}
    text = ", ".join(f"{n} {o!r} -> {v!r}" if n != identity.DATA else "data" for n, o, v in applied)
    logger.warning("resuming %s with --resume-override: %s (recorded in metrics.jsonl)", path, text)
    if metrics is not None:
        row = {"step": step, "resume_override": changes, "checkpoint": str(path)}
        with open(metrics, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


def trim_logs(step: int, metrics: Path | None, skipped_images: Path) -> None:
    """Drop the log lines of steps after the checkpoint we resume from (they will be logged again).

    ``metrics`` (``metrics.jsonl``, on the main process; None elsewhere) and this process's
    ``skipped_images*.txt``; a line cut short by a kill is dropped too.
    """

    def keep(path: Path, step_of) -> None:
        if not path.is_file():
            return
        kept = []
        for ln in path.read_text().splitlines():
            try:
                if ln.strip() and step_of(ln) <= step:
                    kept.append(ln + "\n")
            except (ValueError, IndexError, AttributeError):
                logger.warning("dropping an unreadable line of %s (cut short by a kill?): %r", path, ln[:80])
        path.write_text("".join(kept))

    if metrics is not None:
        keep(metrics, lambda ln: json.loads(ln).get("step", 0))
    keep(skipped_images, lambda ln: int(ln.split("\t", 1)[0].split()[1]))
