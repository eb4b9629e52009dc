"""The Accelerate training loop, with checkpoints that continue a run exactly.

A checkpoint (``<run>/checkpoints/step_XXXXXXXX/``) holds, through ``Accelerator.save_state``, the
model (query encoder, key encoder, queue keys, labels and pointer, step counter), the optimizer and
every process's RNG states; beside them ``config.yaml`` and ``train_state.json`` (epoch, step, position
in the epoch, scheduler, non-finite steps skipped, and the size of every other file of the checkpoint).
Augmentation is seeded per sample and shuffle-BN per step, so a resumed run sees exactly the batches
and crops the uninterrupted run would have: on the CPU its final weights are bit-identical.

A run may be killed at any instruction (SIGKILL, preemption, a power cut):

- a checkpoint is written as ``.tmp_step_X``, its files flushed to disk, ``train_state.json`` written
  last, and the folder renamed to ``step_X`` in one ``os.replace``;
- a checkpoint counts only if ``train_state.json`` parses and every file it lists has the recorded size
  (:func:`checkpoint_problem`), so a half-written, half-deleted or truncated one is never picked;
- old checkpoints are pruned only after the new one is complete, each first renamed out of the
  ``step_*`` namespace (atomic), then deleted; ``.tmp_*`` and ``.trash_*`` folders left by a killed run
  are deleted when the run starts again;
- on resume, ``metrics.jsonl`` and ``skipped_images*.txt`` lose their lines for steps after the
  checkpoint (a line cut by the kill included): those steps are run, and logged, again.

A non-finite loss stops training at once (:class:`NonFiniteLoss`, naming the step and every loss term)
with the last good checkpoint untouched; ``--skip-nonfinite N`` skips up to N such steps instead (see
:meth:`scan_zoo.train.step_guards.StepGuards._nonfinite_step` for what a skipped step does), and no
checkpoint is ever written from a model state holding NaN or infinity.

Ctrl-C and preemption (SIGTERM, SIGUSR1, ``--time-limit``) stop the loop between two steps, every process at
the same step, with a checkpoint (:mod:`scan_zoo.train.interrupt`). The files: the checkpoint's own
(:mod:`scan_zoo.train.checkpoint_io`, :mod:`scan_zoo.train.checkpoints`), skipped and non-finite steps
(:mod:`scan_zoo.train.step_guards`), what a run is built from (:mod:`scan_zoo.train.builders`), the
callbacks a caller watches a run with (:mod:`scan_zoo.train.events`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from scan_zoo.common.distributed import peer_lost
from scan_zoo.common.errors import UserError
from scan_zoo.common.readers import read_safetensors
from scan_zoo.data import datasets as data_lib
from scan_zoo.data.imageio import UnreadableImage, verify_images
from scan_zoo.methods import build_method
from scan_zoo.models.backbones import (
    HEAD_NAME,
    check_input_size,
    create_backbone,
    data_config_for,
    export_backbone,
    load_strict,
)
from scan_zoo.models.loading import load_backbone
from scan_zoo.train import checkpoint_io, identity, interrupt, run_lock
from scan_zoo.train.builders import cosine_lr, eval_dataset, make_accelerator, train_loader, train_transform
from scan_zoo.train.checkpoints import (
    CKPT_DIR,
    abandon_newer,
    discard,
    fsync,
    list_checkpoints,
    remove_leftovers,
    resolve_resume,
)
from scan_zoo.train.config import TrainConfig
from scan_zoo.train.events import Callback, emit
from scan_zoo.train.step_guards import NonFiniteLoss, StepGuards, name_list

__all__ = [
    "NonFiniteLoss",
    "TrainState",
    "Trainer",
    "cosine_lr",
    "eval_dataset",
    "make_accelerator",
    "train_loader",
    "train_transform",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where the run is: completed epochs, optimiser steps, and steps taken in the current epoch."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    skipped_nonfinite: int = 0  # steps skipped so far because the loss was not finite (--skip-nonfinite)


class Trainer(StepGuards):
    """One training run of one method. ``Trainer(cfg).fit()`` trains, checkpoints and exports.

    ``callbacks`` are called at the points of :mod:`scan_zoo.train.events` (each with a
    :class:`scan_zoo.train.events.TrainEvent`)."""

    def __init__(
        self,
        cfg: TrainConfig,
        accelerator=None,
        neighbors: torch.Tensor | None = None,
        callbacks: Iterable[Callback] = (),
    ):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.run_dir = Path(cfg.output_dir)
        self.acc = accelerator or make_accelerator(self.run_dir, dist_timeout=cfg.dist_timeout)
        acc = self.acc
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        set_seed(cfg.seed)  # identical initialisation on every process

        with acc.main_process_first():
            self.data_root = data_lib.resolve_data_root(cfg.data, cfg.data_cache, progress=acc.is_main_process)
            self.train_base = data_lib.image_folder(self.data_root, "train")
        self.num_classes = len(self.train_base.classes)
        n = len(self.train_base)
        if cfg.strict_data:
            try:
                verify_images(
                    [p for p, _ in self.train_base.samples],
                    progress=acc.is_main_process,
                    left_out=getattr(self.train_base, "skipped", ()),
                )
            except UnreadableImage as e:
                raise UserError(f"unreadable training image (--strict-data): {e}") from None
        if cfg.method != "supervised" and cfg.queue_size >= n:
            raise UserError(f"queue_size {cfg.queue_size} must be smaller than the {n} training images")
        if cfg.method == "dsc" and cfg.dsc_queue_size is not None and cfg.dsc_queue_size >= n:
            raise UserError(f"dsc_queue_size {cfg.dsc_queue_size} must be smaller than the {n} training images")

        self.backbone = create_backbone(cfg.model)
        check_input_size(self.backbone, cfg.image_size, cfg.model)
        if cfg.method == "scan":
            if neighbors is None:
                raise UserError("SCAN needs its positive neighbours (stage 1)")
            if neighbors.shape != (n, cfg.k):
                raise UserError(f"neighbour table is {tuple(neighbors.shape)}, expected ({n}, {cfg.k})")
        self.neighbors = neighbors if cfg.method == "scan" else None
        self._data_fingerprint: dict | None = None
        self.method = build_method(cfg, self.backbone, self.num_classes)
        if cfg.method == "scan" and cfg.init_from:
            self.init_from(cfg.init_from)

        anchors = cfg.batch_size // cfg.group_size
        self.sampler = data_lib.NeighborBatchSampler(
            n,
            anchors,
            neighbors if cfg.method == "scan" else None,
            rank=acc.process_index,
            world_size=acc.num_processes,
            seed=cfg.seed,
        )
        self.loader, self.device_views = train_loader(cfg, self.train_base, self.sampler, acc.device)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        warmup = int(round(cfg.warmup_epochs * self.steps_per_epoch))

        params = [p for p in self.method.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, self.total_steps, warmup))
        self.model, self.optimizer = acc.prepare(self.method, optimizer)
        self.state = TrainState()
        self.saved_step = -1  # step of the newest checkpoint on disk
        self.skipped_images = 0  # unreadable training images met by this process since it started
        self.skipped_batches = 0  # steps this process skipped since it started: no image of the batch was readable
        self.preempt_signals = interrupt.parse_signals(cfg.preempt_signals)
        self.deadline = interrupt.Deadline.from_config(cfg.time_limit, cfg.time_limit_margin)
        self.time_up = False  # this process found the deadline due (interrupt.Deadline)

    def init_from(self, ref: str) -> None:
        """Initialise query and key encoders from the label-free model (SCAN inherits MoCo's weights)."""
        src, desc = load_backbone(ref, arch=self.cfg.model)
        src_arch = src.pretrained_cfg.get("architecture")
        if src_arch != self.cfg.model:
            raise UserError(f"--init-from {ref} is a {src_arch} but this run trains a {self.cfg.model} (--model)")
        self.backbone.load_state_dict(src.state_dict(), strict=True)
        head_file = Path(ref) / HEAD_NAME if Path(ref).is_dir() else None
        encoder = getattr(self.method, "encoder_q", None)
        if head_file is not None and head_file.is_file() and encoder is not None:
            load_strict(encoder.head, read_safetensors(head_file), str(head_file))
            desc += " (+ projection head)"
        if hasattr(self.method, "encoder_k"):
            self.method.encoder_k.load_state_dict(self.method.encoder_q.state_dict())
        logger.info("initialised from %s", desc)

    # -------------------------------------------------------------------------------- checkpoints
    def _event(self, point: str, step: int) -> None:
        emit(self.callbacks, point, step, self.acc.process_index, self.run_dir)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_X`` atomically, then prune old ones (module docstring). Every process calls it."""
        acc = self.acc
        root = self.run_dir / CKPT_DIR
        step = self.state.step
        final = root / f"step_{step:08d}"
        if self.saved_step == step:  # nothing new since the last save
            return final
        started = time.perf_counter()
        broken = self._nonfinite_tensors()
        if self._count_processes(bool(broken)):  # never replace good checkpoints by a poisoned one
            raise NonFiniteLoss(
                f"the model state is not finite after step {step} ({name_list(broken)}); no "
                f"checkpoint written, the last good one is {self._last_good()}"
            )
        tmp = root / f".tmp_step_{step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            with self._writing(tmp, final):
                tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        with self._writing(tmp, final):
            acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            with self._writing(tmp, final):
                state = {
                    **asdict(self.state),
                    "scheduler": self.scheduler.state_dict(),
                    "total_steps": self.total_steps,
                    "steps_per_epoch": self.steps_per_epoch,
                    "data": self.data_fingerprint(),
                }
                checkpoint_io.write_checkpoint_files(
                    tmp, self.cfg, state, lambda: self._event("checkpoint_written", step)
                )
                self._event("checkpoint_complete", step)
                if final.exists():  # saved before (a run resumed from further back) or damaged: replaced
                    discard(final)
                os.replace(tmp, final)
                fsync(root)
            self._event("checkpoint_renamed", step)
            others = [c for c in list_checkpoints(self.run_dir) if c != final]  # never prune the new one
            for old in others[: max(0, len(others) - (max(1, self.cfg.keep_checkpoints) - 1))]:
                discard(old)
        acc.wait_for_everyone()
        self.saved_step = step
        self.deadline.note_checkpoint(time.perf_counter() - started)
        return final

    def _writing(self, tmp: Path, final: Path):
        """A write error while making a checkpoint is one line (:func:`scan_zoo.train.checkpoint_io.writing`)."""
        return checkpoint_io.writing(tmp, final, self._last_good, passes=(NonFiniteLoss,), passes_if=peer_lost)

    def data_fingerprint(self) -> dict:
        """The training data's fingerprint (:func:`scan_zoo.train.identity.data_fingerprint`), computed once."""
        if self._data_fingerprint is None:
            self._data_fingerprint = identity.data_fingerprint(self.train_base, self.data_root, self.neighbors)
        return self._data_fingerprint

    def load_checkpoint(self, path: Path) -> None:
        saved = checkpoint_io.read_train_state(path)
        applied = checkpoint_io.check_identity(path, saved, self.cfg, self.data_fingerprint())
        checkpoint_io.check_schedule(path, saved, self.steps_per_epoch, self.total_steps, overridden=bool(applied))
        try:
            self.acc.load_state(str(path))
        except (RuntimeError, KeyError, ValueError, OSError) as e:
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
            raise UserError(f"checkpoint {path} does not fit this run: {' '.join(lines[:2])[:300]}") from None
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = TrainState(
            saved["epoch"], saved["step"], saved["step_in_epoch"], saved.get("skipped_nonfinite", 0)
        )
        self.saved_step = self.state.step
        metrics = self.run_dir / "metrics.jsonl" if self.acc.is_main_process else None
        checkpoint_io.trim_logs(self.state.step, metrics, self.run_dir / self._skipped_images_file())
        if applied:
            checkpoint_io.apply_override(
                self.cfg, self.optimizer, self.scheduler, path, applied, metrics, self.state.step
            )
        logger.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.step)

    # ---------------------------------------------------------------------------------- training
    def fit(self) -> dict:
        """Train (from the checkpoint named by ``cfg.resume`` if any), checkpoint, export. Returns a summary.

        The run directory is locked for the whole run (:mod:`scan_zoo.train.run_lock`)."""
        with run_lock.hold(self.run_dir, self.acc):
            return self._fit()

    def _fit(self) -> dict:
        cfg, acc = self.cfg, self.acc
        resume = resolve_resume(cfg, self.run_dir)
        if resume is not None:
            self.load_checkpoint(resume)
        if acc.is_main_process:
            if resume is not None:
                moved = abandon_newer(self.run_dir, self.state.step)
                if moved:
                    logger.warning(
                        "resumed from step %d, before the newest checkpoint: the newer ones are moved to "
                        "%s (kept, not deleted), so that --resume latest continues this line",
                        self.state.step,
                        moved,
                    )
            remove_leftovers(self.run_dir)
            cfg.save(self.run_dir / "config.yaml")
        acc.init_trackers("train", config={k: v for k, v in cfg.to_dict().items() if v is not None})
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            disable=not acc.is_main_process,
            desc=f"{cfg.method}",
            unit="step",
            dynamic_ncols=True,
        )
        # Reduced precision on the CPU: oneDNN's kernels gave NaN weight gradients in about one run of three
        # (torch 2.14, bf16, test_resnet; never with the native kernels), so they are switched off meanwhile.
        onednn = torch.backends.mkldnn.enabled
        if acc.device.type == "cpu" and acc.mixed_precision in ("bf16", "fp16") and onednn:
            logger.info("%s autocast on the CPU: oneDNN switched off for this run (NaN gradients)", acc.mixed_precision)
            torch.backends.mkldnn.enabled = False
        # Ctrl-C or a preemption: the loop stops between two steps and a checkpoint is saved (scan_zoo.train.interrupt);
        # a second Ctrl-C stops at once, naming the newest complete checkpoint.
        with interrupt.StopRequest(
            lambda: interrupt.Interrupted(self.state.step, self._last_good()),
            notice=acc.is_main_process,
            preempt=self.preempt_signals,
        ) as stop:
            try:
                self._train(bar, stop)
            finally:
                torch.backends.mkldnn.enabled = onednn
                bar.close()  # before any error line, so the error is what the user reads last
                # Persistent loader workers end with their DataLoader: dropped now, not at a later garbage collection,
                # which can run inside a worker forked by the next loader of this process (bench, tests) and fail there.
                self.loader = None
            if self.state.step_in_epoch == self.steps_per_epoch:  # max_steps ended exactly on an epoch boundary
                self.state.epoch, self.state.step_in_epoch = self.state.epoch + 1, 0
            ckpt = self.save_checkpoint()
            # every process stops alike: on Ctrl-C anywhere, else on a preemption anywhere
            interrupted, preempted = self._count_each(stop.requested, stop.preempted is not None or self.time_up)
        for tracker in acc.trackers:
            tracker.finish()
        if interrupted:
            raise interrupt.Interrupted(self.state.step, ckpt)
        if preempted:
            why = stop.preempted or (f"{self.deadline.why} reached" if self.time_up else "signalled on another process")
            raise interrupt.Preempted(self.state.step, ckpt, why)
        summary = {
            "method": cfg.method,
            "model": cfg.model,
            "steps": self.state.step,
            "epochs": self.state.epoch,
            "finished": self.state.step >= self.total_steps,
            "checkpoint": str(ckpt),
            "run_dir": str(self.run_dir),
        }
        if summary["finished"]:
            summary["weights"] = str(self.export())
        return summary

    def _train(self, bar, stop: interrupt.StopRequest) -> None:
        """The epoch loop: until the schedule ends, ``stop_after_steps``, Ctrl-C or a preemption (``stop``, the
        deadline); checkpoints as configured. Before each step the processes agree on whether to stop and on
        whether a batch holds no readable image (one collective for all; none with a single process)."""
        cfg, acc = self.cfg, self.acc
        metrics_file = self.run_dir / "metrics.jsonl"
        stopped = False
        t_last, images_since = time.perf_counter(), 0
        t_step = t_last  # when the previous step ended: a step's time includes waiting for its batch
        self.model.train()
        while self.state.step < self.total_steps and not stopped:
            self.sampler.set_epoch(self.state.epoch, self.state.step_in_epoch)
            with torch.random.fork_rng(devices=[]):  # a new loader iterator draws a seed from the global RNG:
                batches = iter(self.loader)  # kept out of it, or a resume mid-epoch would draw it twice
            for batch in batches:
                if self.device_views is not None and len(batch["index"]):  # --decode device: decode and augment
                    batch = self.device_views(batch, acc.device)  # here, on the device
                self._record_skipped(batch.pop("skipped"))
                self.time_up = self.time_up or self.deadline.due()
                empty, interrupted, preempted = self._count_each(
                    len(batch["index"]) == 0, stop.requested, stop.preempted is not None or self.time_up
                )
                if interrupted or preempted:  # Ctrl-C or a preemption on some process: every process stops here
                    stopped = True
                    break
                if empty:
                    bad = empty
                    self._unreadable_step(empty)
                else:
                    batch = {
                        k: ([t.to(acc.device, non_blocking=True) for t in v] if k == "views" else v.to(acc.device))
                        for k, v in batch.items()
                    }
                    out = self.model(batch)
                    loss = out["loss"]
                    bad = self._count_processes(~torch.isfinite(loss.detach()))  # every process decides alike
                    if bad:
                        self._nonfinite_step(out, bad)  # raises, unless the step may be skipped
                    else:
                        acc.backward(loss)
                        self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.step += 1
                self.state.step_in_epoch += 1
                images_since += len(batch["index"]) * acc.num_processes
                bar.update(1)
                if not bad and (self.state.step % cfg.log_every_steps == 0 or self.state.step == self.total_steps):
                    now = time.perf_counter()
                    stats = {k: acc.reduce(v.detach().float(), "mean").item() for k, v in out.items()}
                    stats.update(
                        lr=self.scheduler.get_last_lr()[0],
                        images_per_s=images_since / (now - t_last),
                        epoch=self.state.epoch,
                        skipped_images=self.skipped_images,
                    )
                    t_last, images_since = now, 0
                    bar.set_postfix(
                        loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.3g}", img_s=f"{stats['images_per_s']:.0f}"
                    )
                    acc.log(stats, step=self.state.step)
                    if acc.is_main_process:
                        with open(metrics_file, "a") as f:
                            f.write(json.dumps({"step": self.state.step, **stats}) + "\n")
                now = time.perf_counter()
                self.deadline.note_step(now - t_step)
                t_step = now
                self._event("step", self.state.step)
                if self.state.step >= self.total_steps:
                    break
                if cfg.save_every_steps and self.state.step % cfg.save_every_steps == 0:
                    self.save_checkpoint()
                if cfg.stop_after_steps is not None and self.state.step >= cfg.stop_after_steps:
                    stopped = True
                    break
            else:  # the epoch ran to its end
                self.state.epoch += 1
                self.state.step_in_epoch = 0
                if self.state.epoch % cfg.save_every_epochs == 0 and self.state.step < self.total_steps:
                    self.save_checkpoint()

    def export(self) -> Path:
        """Backbone alone, plain timm keys, beside timm's config.json (and the projection head, if any)."""
        cfg = self.cfg
        path = self.run_dir / "model.safetensors"
        if self.acc.is_main_process:
            method = self.acc.unwrap_model(self.model)
            head = method.encoder_q.head if hasattr(method, "encoder_q") else None
            dc = data_config_for(cfg.image_size, cfg.eval_resize, data_lib.IMAGENET_MEAN, data_lib.IMAGENET_STD)
            extra = {
                "method": cfg.method,
                "steps": self.state.step,
                "epochs": self.state.epoch,
                "data": cfg.data,
                "num_train_images": len(self.train_base),
                "config": {k: v for k, v in cfg.to_dict().items() if v is not None},
            }
            export_backbone(method.backbone, self.run_dir, dc, extra, head=head)
        self.acc.wait_for_everyone()
        return path
