"""Training events: callbacks a caller hands to :class:`scan_zoo.train.trainer.Trainer` to watch a run.

``Trainer(cfg, callbacks=[fn, ...])`` (or ``run_training(cfg, callbacks=...)``, ``train.main(argv,
callbacks=...)``) calls each ``fn(event)`` with a :class:`TrainEvent` at these points, in this order within
a step and a checkpoint:

- ``step``: every process, after an optimiser step (or a skipped one) and its log line, before any checkpoint
  of that step;
- ``checkpoint_written`` (main process): the state is saved in ``.tmp_step_X``, ``train_state.json`` not yet;
- ``checkpoint_complete`` (main process): ``train_state.json`` written, the folder not yet renamed;
- ``checkpoint_renamed`` (main process): renamed to ``step_X``, older checkpoints not yet pruned.

A callback runs inside the training loop: whatever it does (block, write a file, raise) happens at exactly
that moment, which is what the crash and preemption tests use (tests/pause_train.py). A callback that
blocks on one process blocks the others at their next collective.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

POINTS = ("step", "checkpoint_written", "checkpoint_complete", "checkpoint_renamed")


@dataclass(frozen=True)
class TrainEvent:
    """One point reached: ``point`` (one of :data:`POINTS`), the step (numbered from 1, as in metrics.jsonl),
    the process's rank and the run directory."""

    point: str
    step: int
    rank: int
    run_dir: Path


Callback = Callable[[TrainEvent], None]


def emit(callbacks: Iterable[Callback], point: str, step: int, rank: int, run_dir: Path) -> None:
    """Call every callback with the event (in the order given)."""
    assert point in POINTS, point
    event = TrainEvent(point, step, rank, Path(run_dir))
    for callback in callbacks:
        callback(event)
