"""Learning-rate arithmetic that depends on how many processes share a step.

The linear scaling rule (Goyal et al., "Accurate, Large Minibatch SGD", 2017): when the global batch is
multiplied by k, multiply the learning rate by k. A recipe states its lr for the global batch it was tuned
at (``scan_zoo/recipes/scan_in1k.yaml``: 1.6 for 32 processes x 384 images = 12,288); a run with another number of
processes or another per-process batch keeps the recipe's behaviour by scaling it. ``--lr`` is the lr used,
as given: train.py does not rescale it, so a launch on another number of processes passes the scaled value.
"""

from __future__ import annotations

import math


def global_batch(per_process: int, processes: int) -> int:
    """Images per optimiser step over all processes (SCAN: processes x anchors x (K + 1))."""
    if per_process < 1 or processes < 1:
        raise ValueError(f"per-process batch {per_process} and processes {processes} must be at least 1")
    return per_process * processes


def scale_lr(base_lr: float, global_batch: int, reference_batch: int) -> float:
    """``base_lr x global_batch / reference_batch``: the lr for ``global_batch`` images per step of a recipe
    tuned at ``base_lr`` for ``reference_batch`` images per step (linear scaling rule)."""
    if not (math.isfinite(base_lr) and base_lr > 0):
        raise ValueError(f"base lr must be a positive finite number, got {base_lr}")
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(f"batches must be at least 1, got {global_batch} and {reference_batch}")
    return base_lr * (global_batch / reference_batch)  # the ratio first: the reference batch gives base_lr exactly
