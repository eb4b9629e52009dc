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
:meth:`Trainer._nonfinite_step` for what a skipped step does), and no checkpoint is ever written from a
model state holding NaN or infinity.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch

from scan_zoo.common.distributed import peer_lost
from scan_zoo.common.errors import UserError
from scan_zoo.common.files import sha256_file
from scan_zoo.data import datasets as data_lib
from scan_zoo.methods import build_method, num_views
from scan_zoo.models.backbones import (
    HEAD_NAME,
    check_input_size,
    create_backbone,
    data_config_for,
    export_backbone,
    load_strict,
)
from scan_zoo.models.loading import load_backbone
from scan_zoo.train import identity, interrupt, run_lock
from scan_zoo.train.checkpoints import (
    CKPT_DIR,
    STATE_FILE,
    _discard,
    _fsync,
    _names,
    _pause_point,
    abandon_newer,
    checkpoint_problem,
    list_checkpoints,
    remove_leftovers,
    resolve_resume,
)
from scan_zoo.train.config import TrainConfig

logger = logging.getLogger(__name__)

class NonFiniteLoss(RuntimeError):
    """The loss (or the model state) became NaN or infinite; the last good checkpoint is left as it was."""


@dataclass
class TrainState:
    """Where the run is: completed epochs, optimiser steps, and steps taken in the current epoch."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    skipped_nonfinite: int = 0  # steps skipped so far because the loss was not finite (--skip-nonfinite)


# ---------------------------------------------------------------------------------------- setup helpers
def make_accelerator(output_dir: Path, log_with: Optional[str] = "tensorboard", dist_timeout: float | None = None):
    """``dist_timeout``: seconds a collective waits for the other processes (``--dist-timeout``; None: torch's)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
    from accelerate.utils import ProjectConfiguration

    # Accelerate only forms a CPU process group when asked for the CPU (gloo backend).
    cpu = not torch.cuda.is_available()
    # The queue is identical on every process by construction: no need to broadcast buffers each step.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    handlers = [ddp] if dist_timeout is None else [ddp, InitProcessGroupKwargs(timeout=timedelta(seconds=dist_timeout))]
    return Accelerator(cpu=cpu, log_with=log_with, kwargs_handlers=handlers,
                       project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tb")))


def train_transform(cfg: TrainConfig):
    if cfg.method == "supervised":
        t = data_lib.supervised_transform(cfg.image_size, cfg.crop_scale_min, cfg.hflip)
    else:
        t = data_lib.moco_v2_transform(cfg.image_size, cfg.crop_scale_min, cfg.blur_prob, cfg.hflip,
                                       cfg.jitter_hue, cfg.grayscale_prob)
    return data_lib.MultiView(t, num_views(cfg.method))


def train_loader(cfg: TrainConfig, base, sampler: data_lib.NeighborBatchSampler, device: torch.device):
    """The training DataLoader, and for ``--decode device`` the callable that turns its batches into views on
    ``device`` (:class:`scan_zoo.data.device.DeviceViews`; None for ``--decode cpu``). benchmarks/data.py uses it too."""
    transform = train_transform(cfg)
    pin = torch.device(device).type == "cuda"
    data_lib.cache_small_dataset(base)  # the digit scenes: decoded once per worker, not once per epoch
    if cfg.decode == "device":
        from scan_zoo.data import device as device_data
        loader = data_lib.make_loader(device_data.EncodedViews(base, transform), sampler, cfg.num_workers,
                                      pin_memory=pin, collate_fn=device_data.collate_encoded)
        return loader, device_data.DeviceViews(transform)
    return data_lib.make_loader(data_lib.SeededViews(base, transform), sampler, cfg.num_workers, pin_memory=pin), None


def eval_dataset(cfg: TrainConfig, base) -> data_lib.EvalImages:
    return data_lib.EvalImages(base, data_lib.eval_transform(cfg.image_size, cfg.eval_resize))


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak lr: linear warm-up, then half a cosine to zero (per step)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------- the run
class Trainer:
    """One training run of one method. ``Trainer(cfg).fit()`` trains, checkpoints and exports."""

    def __init__(self, cfg: TrainConfig, accelerator=None, neighbors: Optional[torch.Tensor] = None):
        from accelerate.utils import set_seed

        self.cfg = cfg
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
            from scan_zoo.data.imageio import UnreadableImage, verify_images

            try:
                verify_images([p for p, _ in self.train_base.samples], progress=acc.is_main_process,
                              left_out=getattr(self.train_base, "skipped", ()))
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
        self._data_fingerprint: Optional[dict] = None
        self.method = build_method(cfg, self.backbone, self.num_classes)
        if cfg.method == "scan" and cfg.init_from:
            self.init_from(cfg.init_from)

        anchors = cfg.batch_size // cfg.group_size
        self.sampler = data_lib.NeighborBatchSampler(n, anchors, neighbors if cfg.method == "scan" else None,
                                                     rank=acc.process_index, world_size=acc.num_processes,
                                                     seed=cfg.seed)
        self.loader, self.device_views = train_loader(cfg, self.train_base, self.sampler, acc.device)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        warmup = int(round(cfg.warmup_epochs * self.steps_per_epoch))

        params = [p for p in self.method.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: cosine_lr(s, self.total_steps, warmup))
        self.model, self.optimizer = acc.prepare(self.method, optimizer)
        self.state = TrainState()
        self.saved_step = -1  # step of the newest checkpoint on disk
        self.skipped_images = 0  # unreadable training images met by this process since it started
        self.skipped_batches = 0  # steps this process skipped since it started: no image of the batch was readable

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
            from scan_zoo.common.readers import read_safetensors

            load_strict(encoder.head, read_safetensors(head_file), str(head_file))
            desc += " (+ projection head)"
        if hasattr(self.method, "encoder_k"):
            self.method.encoder_k.load_state_dict(self.method.encoder_q.state_dict())
        logger.info("initialised from %s", desc)

    # -------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_X`` atomically, then prune old ones (module docstring). Every process calls it."""
        acc = self.acc
        root = self.run_dir / CKPT_DIR
        step = self.state.step
        final = root / f"step_{step:08d}"
        if self.saved_step == step:  # nothing new since the last save
            return final
        broken = self._nonfinite_tensors()
        if self._count_processes(bool(broken)):  # never replace good checkpoints by a poisoned one
            raise NonFiniteLoss(f"the model state is not finite after step {step} ({_names(broken)}); no checkpoint "
                                f"written, the last good one is {self._last_good()}")
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
                self._write_checkpoint_files(tmp, step)
                _pause_point(self.run_dir, "checkpoint_complete", step)
                if final.exists():  # saved before (a run resumed from further back) or damaged: replaced
                    _discard(final)
                os.replace(tmp, final)
                _fsync(root)
            _pause_point(self.run_dir, "checkpoint_renamed", step)
            others = [c for c in list_checkpoints(self.run_dir) if c != final]  # never prune the new one
            for old in others[:max(0, len(others) - (max(1, self.cfg.keep_checkpoints) - 1))]:
                _discard(old)
        acc.wait_for_everyone()
        self.saved_step = step
        return final

    @contextlib.contextmanager
    def _writing(self, tmp: Path, final: Path):
        """A write error (a full disk, a quota, a failing device) while making a checkpoint: the unfinished
        ``tmp`` is removed and the run ends with one line; the last good checkpoint is untouched."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            if isinstance(e, NonFiniteLoss) or peer_lost(e) is not None:  # not a write error: train.py reports it
                raise
            self._write_failed(tmp, final, e)
        except Exception as e:
            if type(e).__name__ != "SafetensorError":  # safetensors' own error type for a failed write
                raise
            self._write_failed(tmp, final, e)

    def _write_failed(self, tmp: Path, final: Path, e: Exception) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = str(getattr(e, "strerror", None) or e).strip().splitlines() or [type(e).__name__]
        raise UserError(f"could not write checkpoint {final.name} in {final.parent}: {lines[0][:300]}; the last good "
                        f"checkpoint, {self._last_good()}, is unchanged (make room, then continue with "
                        "--resume latest)") from None

    def _write_checkpoint_files(self, tmp: Path, step: int) -> None:
        """Beside what ``save_state`` wrote: the config, then ``train_state.json`` (last: marks completeness) with
        the position, the data fingerprint, and the size and sha256 of every other file."""
        self.cfg.save(tmp / "config.yaml")
        _pause_point(self.run_dir, "checkpoint_written", step)
        names = [f.relative_to(tmp).as_posix() for f in sorted(tmp.rglob("*")) if f.is_file()]
        files = {name: (tmp / name).stat().st_size for name in names}
        for name in names:
            _fsync(tmp / name)
        state = {**asdict(self.state), "scheduler": self.scheduler.state_dict(), "total_steps": self.total_steps,
                 "steps_per_epoch": self.steps_per_epoch, "files": files,
                 "sha256": {name: sha256_file(tmp / name) for name in names},
                 "data": self.data_fingerprint()}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        _fsync(tmp / STATE_FILE)
        _fsync(tmp)

    def data_fingerprint(self) -> dict:
        """The training data's fingerprint (:func:`scan_zoo.train.identity.data_fingerprint`), computed once."""
        if self._data_fingerprint is None:
            self._data_fingerprint = identity.data_fingerprint(self.train_base, self.data_root, self.neighbors)
        return self._data_fingerprint

    def _check_identity(self, path: Path, saved: dict) -> list:
        """The checkpoint's config and data against this run's (:func:`scan_zoo.train.identity.check_resume`)."""
        import yaml

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
            logger.warning("checkpoint %s records no data fingerprint (written by an older version): the training "
                           "data cannot be compared", path)
        return identity.check_resume(path, saved_cfg, saved.get("data"), self.cfg, self.data_fingerprint())

    def _apply_override(self, path: Path, applied: list) -> None:
        """Continue with the new values: optimiser hyper-parameters and the lr schedule are rebuilt from this
        run's config (the checkpoint's optimizer and scheduler state carry the old ones), and the change is
        recorded in ``metrics.jsonl``."""
        cfg = self.cfg
        groups = self.optimizer.param_groups
        for g in groups:
            g.update(initial_lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
        sched = self.scheduler
        sched.base_lrs = [cfg.lr for _ in groups]
        now = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for g, lr in zip(groups, now):
            g["lr"] = lr
        sched._last_lr = now
        changes = {name: {"old": old, "new": new} for name, old, new in applied}
        text = ", ".join(f"{n} {o!r} -> {v!r}" if n != identity.DATA else "data" for n, o, v in applied)
        logger.warning("resuming %s with --resume-override: %s (recorded in metrics.jsonl)", path, text)
        if self.acc.is_main_process:
            row = {"step": self.state.step, "resume_override": changes, "checkpoint": str(path)}
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row, default=str) + "\n")

    def load_checkpoint(self, path: Path) -> None:
        saved = json.loads((path / STATE_FILE).read_text())
        applied = self._check_identity(path, saved)
        if saved.get("steps_per_epoch") != self.steps_per_epoch:
            raise UserError(f"checkpoint {path} was made with {saved.get('steps_per_epoch')} steps per epoch, "
                            f"this run has {self.steps_per_epoch}: same data, batch size and process count needed")
        try:
            self.acc.load_state(str(path))
        except (RuntimeError, KeyError, ValueError, OSError) as e:
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
            raise UserError(f"checkpoint {path} does not fit this run: {' '.join(lines[:2])[:300]}") from None
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = TrainState(saved["epoch"], saved["step"], saved["step_in_epoch"],
                                saved.get("skipped_nonfinite", 0))
        self.saved_step = self.state.step
        self._trim_logs(self.state.step)
        if applied:
            self._apply_override(path, applied)
        elif saved.get("total_steps") != self.total_steps:
            logger.warning("checkpoint %s was made for a %s-step schedule; this run has %d steps (--epochs/--max-steps"
                           " changed): the cosine schedule changes from here", path, saved.get("total_steps"),
                           self.total_steps)
        logger.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.step)

    def _trim_logs(self, step: int) -> None:
        """Drop the log lines of steps after the checkpoint we resume from (they will be logged again).

        ``metrics.jsonl`` (main process) and this process's ``skipped_images*.txt``; a line cut short by a
        kill is dropped too.
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

        if self.acc.is_main_process:
            keep(self.run_dir / "metrics.jsonl", lambda ln: json.loads(ln).get("step", 0))
        keep(self.run_dir / self._skipped_images_file(), lambda ln: int(ln.split("\t", 1)[0].split()[1]))

    # ---------------------------------------------------------------------------------- training
    def fit(self) -> dict:
        """Train (from the checkpoint named by ``cfg.resume`` if any), checkpoint, export. Returns a summary.

        The run directory is locked for the whole run (:mod:`scan_zoo.train.run_lock`)."""
        with run_lock.hold(self.run_dir, self.acc):
            return self._fit()

    def _fit(self) -> dict:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        resume = resolve_resume(cfg, self.run_dir)
        if resume is not None:
            self.load_checkpoint(resume)
        if acc.is_main_process:
            if resume is not None:
                moved = abandon_newer(self.run_dir, self.state.step)
                if moved:
                    logger.warning("resumed from step %d, before the newest checkpoint: the newer ones are moved to "
                                   "%s (kept, not deleted), so that --resume latest continues this line",
                                   self.state.step, moved)
            remove_leftovers(self.run_dir)
            cfg.save(self.run_dir / "config.yaml")
        acc.init_trackers("train", config={k: v for k, v in cfg.to_dict().items() if v is not None})
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not acc.is_main_process,
                   desc=f"{cfg.method}", unit="step", dynamic_ncols=True)
        # Reduced precision on the CPU: oneDNN's kernels gave NaN weight gradients in about one run of three
        # (torch 2.14, bf16, test_resnet; never with the native kernels), so they are switched off meanwhile.
        onednn = torch.backends.mkldnn.enabled
        if acc.device.type == "cpu" and acc.mixed_precision in ("bf16", "fp16") and onednn:
            logger.info("%s autocast on the CPU: oneDNN switched off for this run (NaN gradients)", acc.mixed_precision)
            torch.backends.mkldnn.enabled = False
        # Ctrl-C: the loop stops between two steps and a checkpoint is saved (scan_zoo.train.interrupt); a second Ctrl-C
        # stops at once, naming the newest complete checkpoint.
        with interrupt.StopRequest(lambda: interrupt.Interrupted(self.state.step, self._last_good()),
                                   notice=acc.is_main_process) as stop:
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
            interrupted = self._count_processes(stop.requested)  # every process stops alike
        for tracker in acc.trackers:
            tracker.finish()
        if interrupted:
            raise interrupt.Interrupted(self.state.step, ckpt)
        summary = {"method": cfg.method, "model": cfg.model, "steps": self.state.step, "epochs": self.state.epoch,
                   "finished": self.state.step >= self.total_steps, "checkpoint": str(ckpt), "run_dir": str(self.run_dir)}
        if summary["finished"]:
            summary["weights"] = str(self.export())
        return summary

    def _train(self, bar, stop: interrupt.StopRequest) -> None:
        """The epoch loop: until the schedule ends, ``stop_after_steps`` or Ctrl-C (``stop``); checkpoints as
        configured. Before each step the processes agree on whether to stop and on whether a batch holds no
        readable image (one collective for both; none with a single process)."""
        cfg, acc = self.cfg, self.acc
        metrics_file = self.run_dir / "metrics.jsonl"
        stopped = False
        t_last, images_since = time.perf_counter(), 0
        self.model.train()
        while self.state.step < self.total_steps and not stopped:
            self.sampler.set_epoch(self.state.epoch, self.state.step_in_epoch)
            with torch.random.fork_rng(devices=[]):  # a new loader iterator draws a seed from the global RNG:
                batches = iter(self.loader)  # kept out of it, or a resume mid-epoch would draw it twice
            for batch in batches:
                if self.device_views is not None and len(batch["index"]):  # --decode device: decode and augment
                    batch = self.device_views(batch, acc.device)  # here, on the device
                self._record_skipped(batch.pop("skipped"))
                empty, interrupted = self._count_each(len(batch["index"]) == 0, stop.requested)
                if interrupted:  # Ctrl-C on some process: every process stops before this step
                    stopped = True
                    break
                if empty:
                    bad = empty
                    self._unreadable_step(empty)
                else:
                    batch = {k: ([t.to(acc.device, non_blocking=True) for t in v] if k == "views"
                                 else v.to(acc.device)) for k, v in batch.items()}
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
                    stats.update(lr=self.scheduler.get_last_lr()[0], images_per_s=images_since / (now - t_last),
                                 epoch=self.state.epoch, skipped_images=self.skipped_images)
                    t_last, images_since = now, 0
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.3g}",
                                    img_s=f"{stats['images_per_s']:.0f}")
                    acc.log(stats, step=self.state.step)
                    if acc.is_main_process:
                        with open(metrics_file, "a") as f:
                            f.write(json.dumps({"step": self.state.step, **stats}) + "\n")
                _pause_point(self.run_dir, "step", self.state.step, acc.process_index)
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
        logger.warning("skipped step %d (epoch %d): every image of its batch was unreadable%s (listed in %s)", step,
                       self.state.epoch, where, self.run_dir / self._skipped_images_file())
        if self.acc.is_main_process:
            row = {"step": step, "epoch": self.state.epoch, "skipped_unreadable": self.skipped_batches,
                   "processes": processes}
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
            allowance = (f"{self.state.skipped_nonfinite} non-finite step(s) skipped already, the most "
                         f"--skip-nonfinite {cfg.skip_nonfinite} allows" if cfg.skip_nonfinite else
                         "--skip-nonfinite N would skip up to N such steps")
            raise NonFiniteLoss(f"{what}; the last good checkpoint is {self._last_good()} ({allowance})")
        broken = self._nonfinite_tensors()
        if self._count_processes(bool(broken)):
            raise NonFiniteLoss(f"{what}; the model state is not finite either ({_names(broken)}), so skipping cannot "
                                f"help; the last good checkpoint is {self._last_good()}")
        self.state.skipped_nonfinite += 1
        logger.warning("skipped step %d (%d of at most %d non-finite steps): %s", step, self.state.skipped_nonfinite,
                       cfg.skip_nonfinite, what)
        if self.acc.is_main_process:
            json_terms = [{k: (v if math.isfinite(v) else str(v)) for k, v in t.items()} for t in terms]
            row = {"step": step, "epoch": self.state.epoch, "skipped_nonfinite": self.state.skipped_nonfinite,
                   "terms": json_terms if len(json_terms) > 1 else json_terms[0]}
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

    def _last_good(self) -> str:
        """The newest checkpoint whose content matches its recorded hashes (a corrupt one never counts)."""
        for ckpt in reversed(list_checkpoints(self.run_dir)):
            problem = checkpoint_problem(ckpt, verify=True)
            if problem is None:
                return str(ckpt)
            logger.warning("checkpoint %s is corrupt: %s", ckpt, problem)
        return f"none yet (in {self.run_dir / CKPT_DIR})"

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

    def export(self) -> Path:
        """Backbone alone, plain timm keys, beside timm's config.json (and the projection head, if any)."""
        cfg = self.cfg
        path = self.run_dir / "model.safetensors"
        if self.acc.is_main_process:
            method = self.acc.unwrap_model(self.model)
            head = method.encoder_q.head if hasattr(method, "encoder_q") else None
            dc = data_config_for(cfg.image_size, cfg.eval_resize, data_lib.IMAGENET_MEAN, data_lib.IMAGENET_STD)
            extra = {"method": cfg.method, "steps": self.state.step, "epochs": self.state.epoch,
                     "data": cfg.data, "num_train_images": len(self.train_base),
                     "config": {k: v for k, v in cfg.to_dict().items() if v is not None}}
            export_backbone(method.backbone, self.run_dir, dc, extra, head=head)
        self.acc.wait_for_everyone()
        return path
