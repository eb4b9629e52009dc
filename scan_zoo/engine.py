"""The Accelerate training loop, with checkpoints that continue a run exactly.

A checkpoint (``<run>/checkpoints/step_XXXXXXXX/``) holds, through ``Accelerator.save_state``, the
model (query encoder, key encoder, queue keys, labels and pointer, step counter), the optimizer and
every process's RNG states; beside them ``train_state.json`` (epoch, step, position in the epoch,
scheduler) and ``config.yaml``. It is written under a temporary name and renamed when complete; old
ones are pruned only after that. Augmentation is seeded per sample and shuffle-BN per step, so a
resumed run sees exactly the batches and crops the uninterrupted run would have.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import data as data_lib
from .config import TrainConfig
from .errors import UserError
from .methods import build_method, num_views
from .models import (
    HEAD_NAME,
    create_backbone,
    data_config_for,
    export_backbone,
    load_backbone,
    load_strict,
)

logger = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
STATE_FILE = "train_state.json"


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


@dataclass
class TrainState:
    """Where the run is: completed epochs, optimiser steps, and steps taken in the current epoch."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0


# ---------------------------------------------------------------------------------------- setup helpers
def make_accelerator(output_dir: Path, log_with: Optional[str] = "tensorboard"):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration

    # Accelerate only forms a CPU process group when asked for the CPU (gloo backend).
    cpu = not torch.cuda.is_available()
    # The queue is identical on every process by construction: no need to broadcast buffers each step.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(cpu=cpu, log_with=log_with, kwargs_handlers=[ddp],
                       project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tb")))


def train_transform(cfg: TrainConfig):
    if cfg.method == "supervised":
        t = data_lib.supervised_transform(cfg.image_size, cfg.crop_scale_min, cfg.hflip)
    else:
        t = data_lib.moco_v2_transform(cfg.image_size, cfg.crop_scale_min, cfg.blur_prob, cfg.hflip,
                                       cfg.jitter_hue, cfg.grayscale_prob)
    return data_lib.MultiView(t, num_views(cfg.method))


def eval_dataset(cfg: TrainConfig, base) -> data_lib.EvalImages:
    return data_lib.EvalImages(base, data_lib.eval_transform(cfg.image_size, cfg.eval_resize))


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak lr: linear warm-up, then half a cosine to zero (per step)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (by the step recorded inside, not by folder name)."""
    root = Path(run_dir) / CKPT_DIR
    found = []
    for d in root.glob("step_*"):
        state = d / STATE_FILE
        if d.is_dir() and state.is_file():
            found.append((json.loads(state.read_text())["step"], d))
    return [d for _, d in sorted(found)]


def resolve_resume(cfg: TrainConfig, run_dir: Path) -> Optional[Path]:
    if cfg.resume in (None, "", "none"):
        if list_checkpoints(run_dir):
            raise UserError(f"{run_dir} already holds checkpoints: pass --resume latest to continue that run, "
                            "or choose another --output-dir")
        return None
    if cfg.resume == "latest":
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            logger.info("no checkpoint in %s yet: starting from the beginning", run_dir)
        return ckpts[-1] if ckpts else None
    path = Path(cfg.resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"not a complete checkpoint directory: {path}")
    return path


# ----------------------------------------------------------------------------------------- the run
class Trainer:
    """One training run of one method. ``Trainer(cfg).fit()`` trains, checkpoints and exports."""

    def __init__(self, cfg: TrainConfig, accelerator=None, neighbors: Optional[torch.Tensor] = None):
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.acc = accelerator or make_accelerator(self.run_dir)
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
            from .imageio import UnreadableImage, verify_images

            try:
                verify_images([p for p, _ in self.train_base.samples], progress=acc.is_main_process)
            except UnreadableImage as e:
                raise UserError(f"unreadable training image (--strict-data): {e}") from None
        if cfg.method != "supervised" and cfg.queue_size >= n:
            raise UserError(f"queue_size {cfg.queue_size} must be smaller than the {n} training images")

        self.backbone = create_backbone(cfg.model)
        if cfg.method == "scan":
            if neighbors is None:
                raise UserError("SCAN needs its positive neighbours (stage 1)")
            if neighbors.shape != (n, cfg.k):
                raise UserError(f"neighbour table is {tuple(neighbors.shape)}, expected ({n}, {cfg.k})")
        self.method = build_method(cfg, self.backbone, self.num_classes)
        if cfg.method == "scan" and cfg.init_from:
            self._init_from(cfg.init_from)

        anchors = cfg.batch_size // cfg.group_size
        self.sampler = data_lib.NeighborBatchSampler(n, anchors, neighbors if cfg.method == "scan" else None,
                                                     rank=acc.process_index, world_size=acc.num_processes,
                                                     seed=cfg.seed)
        dataset = data_lib.SeededViews(self.train_base, train_transform(cfg))
        self.loader = data_lib.make_loader(dataset, self.sampler, cfg.num_workers,
                                           pin_memory=acc.device.type == "cuda")
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

    def _init_from(self, ref: str) -> None:
        """Initialise query and key encoders from the label-free model (SCAN inherits MoCo's weights)."""
        src, desc = load_backbone(ref, arch=self.cfg.model)
        src_arch = src.pretrained_cfg.get("architecture")
        if src_arch != self.cfg.model:
            raise UserError(f"--init-from {ref} is a {src_arch} but this run trains a {self.cfg.model} (--model)")
        self.backbone.load_state_dict(src.state_dict(), strict=True)
        head_file = Path(ref) / HEAD_NAME if Path(ref).is_dir() else None
        encoder = getattr(self.method, "encoder_q", None)
        if head_file is not None and head_file.is_file() and encoder is not None:
            from safetensors.torch import load_file

            load_strict(encoder.head, load_file(str(head_file)), str(head_file))
            desc += " (+ projection head)"
        if hasattr(self.method, "encoder_k"):
            self.method.encoder_k.load_state_dict(self.method.encoder_q.state_dict())
        logger.info("initialised from %s", desc)

    # -------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        acc = self.acc
        root = self.run_dir / CKPT_DIR
        final = root / f"step_{self.state.step:08d}"
        if self.saved_step == self.state.step:  # nothing new since the last save
            return final
        tmp = root / f".tmp_step_{self.state.step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.cfg.save(tmp / "config.yaml")
            state = {**self.state.__dict__, "scheduler": self.scheduler.state_dict(),
                     "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))  # written last: marks completeness
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(self.run_dir)[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self.saved_step = self.state.step
        return final

    def load_checkpoint(self, path: Path) -> None:
        saved = json.loads((path / STATE_FILE).read_text())
        if saved.get("steps_per_epoch") != self.steps_per_epoch:
            raise UserError(f"checkpoint {path} was made with {saved.get('steps_per_epoch')} steps per epoch, "
                            f"this run has {self.steps_per_epoch}: same data, batch size and process count needed")
        self.acc.load_state(str(path))
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = TrainState(saved["epoch"], saved["step"], saved["step_in_epoch"])
        self.saved_step = self.state.step
        self._trim_metrics(self.state.step)
        if saved.get("total_steps") != self.total_steps:
            logger.warning("checkpoint %s was made for a %s-step schedule; this run has %d steps (--epochs/--max-steps"
                           " changed): the cosine schedule changes from here", path, saved.get("total_steps"),
                           self.total_steps)
        logger.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.step)

    def _trim_metrics(self, step: int) -> None:
        """Drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
        path = self.run_dir / "metrics.jsonl"
        if self.acc.is_main_process and path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
            path.write_text("".join(ln + "\n" for ln in keep))

    # ---------------------------------------------------------------------------------- training
    def fit(self) -> dict:
        """Train (from the checkpoint named by ``cfg.resume`` if any), checkpoint, export. Returns a summary."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.acc
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resume = resolve_resume(cfg, self.run_dir)
        if resume is not None:
            self.load_checkpoint(resume)
        if acc.is_main_process:
            cfg.save(self.run_dir / "config.yaml")
        acc.init_trackers("train", config={k: v for k, v in cfg.to_dict().items() if v is not None})
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not acc.is_main_process,
                   desc=f"{cfg.method}", unit="step", dynamic_ncols=True)
        try:
            self._train(bar)
        finally:
            bar.close()  # before any error line, so the error is what the user reads last
        if self.state.step_in_epoch == self.steps_per_epoch:  # max_steps ended exactly on an epoch boundary
            self.state.epoch, self.state.step_in_epoch = self.state.epoch + 1, 0
        ckpt = self.save_checkpoint()
        for tracker in acc.trackers:
            tracker.finish()
        summary = {"method": cfg.method, "model": cfg.model, "steps": self.state.step, "epochs": self.state.epoch,
                   "finished": self.state.step >= self.total_steps, "checkpoint": str(ckpt), "run_dir": str(self.run_dir)}
        if summary["finished"]:
            summary["weights"] = str(self.export())
        return summary

    def _train(self, bar) -> None:
        """The epoch loop: until the schedule ends or ``stop_after_steps``; checkpoints as configured."""
        cfg, acc = self.cfg, self.acc
        metrics_file = self.run_dir / "metrics.jsonl"
        stopped = False
        t_last, images_since = time.perf_counter(), 0
        self.model.train()
        while self.state.step < self.total_steps and not stopped:
            self.sampler.set_epoch(self.state.epoch, self.state.step_in_epoch)
            for batch in self.loader:
                self._record_skipped(batch.pop("skipped"))
                batch = {k: ([t.to(acc.device, non_blocking=True) for t in v] if k == "views"
                             else v.to(acc.device)) for k, v in batch.items()}
                out = self.model(batch)
                loss = out["loss"]
                bad = (~torch.isfinite(loss.detach())).float()
                if acc.num_processes > 1:
                    bad = acc.reduce(bad, "sum")  # every process stops together, none waits in a collective
                if bad.item() > 0:
                    raise NonFiniteLoss(f"loss is not finite at step {self.state.step} (epoch {self.state.epoch}) on "
                                        f"{int(bad.item())} process(es); the last good checkpoint is in "
                                        f"{self.run_dir / CKPT_DIR}")
                acc.backward(loss)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.step += 1
                self.state.step_in_epoch += 1
                images_since += len(batch["index"]) * acc.num_processes
                bar.update(1)
                if self.state.step % cfg.log_every_steps == 0 or self.state.step == self.total_steps:
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

    def _record_skipped(self, reasons: list) -> None:
        """Unreadable images are dropped from their batch; each is logged and listed in the run directory."""
        if not reasons:
            return
        self.skipped_images += len(reasons)
        name = "skipped_images.txt" if self.acc.num_processes == 1 else f"skipped_images.rank{self.acc.process_index}.txt"
        with open(self.run_dir / name, "a") as f:
            for r in reasons:
                logger.warning("skipped unreadable image at step %d: %s", self.state.step, r)
                f.write(f"step {self.state.step}\t{r}\n")

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
