"""What the training loop does with a step it cannot take as usual: a batch without one readable image (a
skipped step), a non-finite loss (:class:`NonFiniteLoss`, or a step skipped under ``--skip-nonfinite``), and
the per-process agreement both need (every process decides alike, at the same step).

:class:`StepGuards` is a part of :class:`scan_zoo.train.trainer.Trainer`; it uses the trainer's ``acc``,
``cfg``, ``state``, ``model`` and ``run_dir``.
"""

from __future__ import annotations

import json
import logging
import math

import torch

from scan_zoo.train.checkpoints import last_good

logger = logging.getLogger("scan_zoo.train.trainer")  # the run's messages under one name


class NonFiniteLoss(RuntimeError):
    """The loss (or the model state) became NaN or infinite; the last good checkpoint is left as it was."""


def name_list(names: list[str], most: int = 3) -> str:
    """``a, b, c and 4 more`` (empty: the culprit is on another process)."""
    if not names:
        return "on another process"
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


class StepGuards:
    """Skipped and non-finite steps, unreadable images, and counting on how many processes a flag holds."""

    def _unreadable_step(self, processes: int) -> None:
        """On ``processes`` processes no image of the batch could be read: every process skips this step.

        As a skipped non-finite step, it consumes its batch and counts as a step, with no optimiser step; unlike
        one, it runs no forward pass either (nothing to compute from), so no weight, queue or BatchNorm statistic
        changes. It needs no ``--skip-nonfinite`` allowance: the images are listed in ``skipped_images*.txt``, the
        step is logged and counted in ``metrics.jsonl`` (``skipped_unreadable``, steps skipped by this process
        since it started).
        """
        step = self.state.step + 1  # numbered as in metrics.jsonl: the first step is step 1
        self.skipped_batches += 1
        where = f" on {processes} of {self.acc.num_processes} processes" if self.acc.num_processes > 1 else ""
        logger.warning(
            "skipped step %d (epoch %d): every image of its batch was unreadable%s (listed in %s)",
            step,
            self.state.epoch,
            where,
            self.run_dir / self._skipped_images_file(),
        )
        if self.acc.is_main_process:
            row = {
                "step": step,
                "epoch": self.state.epoch,
                "skipped_unreadable": self.skipped_batches,
                "processes": processes,
            }
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        self.acc.log({"skipped_unreadable": self.skipped_batches}, step=step)

    def _nonfinite_step(self, out: dict, processes: int) -> None:
        """The loss is not finite on ``processes`` processes: skip this step (``--skip-nonfinite``) or raise.

        Every process calls this and decides alike. A skipped step consumes its batch and counts as a step
        (data position, lr schedule and shuffle-BN seed move on as usual), but takes no optimiser step: the
        query encoder's weights and SGD's momentum stay as they were. What the forward pass changed is kept as
        it left it: for the contrastive methods the key encoder's momentum step (towards the unchanged query
        weights) and the batch's keys in the queue, so the queue pointer still counts every image read; for
        all methods the BatchNorm running statistics. That is sound only while every weight, buffer and queue
        entry is finite; if one is not, all later steps would fail too, so the step is not skipped and
        training stops.
        """
        cfg = self.cfg
        step = self.state.step + 1  # numbered as in metrics.jsonl: the first step is step 1
        terms = self._loss_terms(out)  # [process] -> {term: value}
        rows = [", ".join(f"{k}={v:.6g}" for k, v in t.items()) for t in terms]
        text = rows[0] if len(rows) == 1 else "; ".join(f"process {r}: {row}" for r, row in enumerate(rows))
        where = f" on {processes} of {self.acc.num_processes} processes" if self.acc.num_processes > 1 else ""
        what = f"loss is not finite at step {step} (epoch {self.state.epoch}){where}: {text}"
        if self.state.skipped_nonfinite >= cfg.skip_nonfinite:
            allowance = (
                f"{self.state.skipped_nonfinite} non-finite step(s) skipped already, the most "
                f"--skip-nonfinite {cfg.skip_nonfinite} allows"
                if cfg.skip_nonfinite
                else "--skip-nonfinite N would skip up to N such steps"
            )
            raise NonFiniteLoss(f"{what}; the last good checkpoint is {self._last_good()} ({allowance})")
        broken = self._nonfinite_tensors()
        if self._count_processes(bool(broken)):
            raise NonFiniteLoss(
                f"{what}; the model state is not finite either ({name_list(broken)}), so skipping cannot "
                f"help; the last good checkpoint is {self._last_good()}"
            )
        self.state.skipped_nonfinite += 1
        logger.warning(
            "skipped step %d (%d of at most %d non-finite steps): %s",
            step,
            self.state.skipped_nonfinite,
            cfg.skip_nonfinite,
            what,
        )
        if self.acc.is_main_process:
            json_terms = [{k: (v if math.isfinite(v) else str(v)) for k, v in t.items()} for t in terms]
            row = {
                "step": step,
                "epoch": self.state.epoch,
                "skipped_nonfinite": self.state.skipped_nonfinite,
                "terms": json_terms if len(json_terms) > 1 else json_terms[0],
            }
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        self.acc.log({"skipped_nonfinite": self.state.skipped_nonfinite}, step=step)

    def _loss_terms(self, out: dict) -> list[dict]:
        """What the method returned (``loss`` and its other scalars), per process: ``[{name: float}]``."""
        names = list(out)
        values = torch.stack([out[k].detach().float().reshape(()) for k in names])[None]  # [1, T]
        if self.acc.num_processes > 1:
            values = self.acc.gather(values)  # [P, T]
        return [dict(zip(names, row)) for row in values.tolist()]

    def _nonfinite_tensors(self) -> list[str]:
        """This process's parameters and buffers (key encoder, queue, BN statistics too) that hold NaN or inf."""
        method = self.acc.unwrap_model(self.model)
        named = list(method.named_parameters()) + list(method.named_buffers())
        return [n for n, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]

    def _count_processes(self, flag) -> int:
        """On how many processes ``flag`` holds (a collective when there are several: every process calls it)."""
        t = torch.as_tensor(flag, dtype=torch.float32, device=self.acc.device)
        if self.acc.num_processes > 1:
            t = self.acc.reduce(t, "sum")
        return int(t.item())

    def _count_each(self, *flags: bool) -> list[int]:
        """On how many processes each flag holds: one collective for all of them (none, and no device
        synchronisation, with a single process). Every process calls it."""
        if self.acc.num_processes == 1:
            return [int(bool(f)) for f in flags]
        t = torch.tensor([float(bool(f)) for f in flags], device=self.acc.device)
        return [int(v) for v in self.acc.reduce(t, "sum").tolist()]

    def _skipped_images_file(self) -> str:
        if self.acc.num_processes == 1:
            return "skipped_images.txt"
        return f"skipped_images.rank{self.acc.process_index}.txt"

    def _record_skipped(self, reasons: list) -> None:
        """Unreadable images are dropped from their batch; each is logged and listed in the run directory."""
        if not reasons:
            return
        self.skipped_images += len(reasons)
        step = self.state.step + 1  # the step this batch is for, numbered as in metrics.jsonl
        with open(self.run_dir / self._skipped_images_file(), "a") as f:
            for r in reasons:
                logger.warning("skipped unreadable image at step %d: %s", step, r)
                f.write(f"step {step}\t{r}\n")

    def _last_good(self) -> str:
        return last_good(self.run_dir)
