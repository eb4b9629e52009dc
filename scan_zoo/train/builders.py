"""What a training run is built from: the Accelerator, the training loader and its transform, the lr schedule."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import ProjectConfiguration

from scan_zoo.data import datasets as data_lib
from scan_zoo.data import device as device_data
from scan_zoo.methods import num_views
from scan_zoo.train import interrupt
from scan_zoo.train.config import TrainConfig


def make_accelerator(output_dir: Path, log_with: str | None = "tensorboard", dist_timeout: float | None = None):
    """The run's Accelerator. ``dist_timeout``: seconds a collective waits for the other processes
    (``--dist-timeout``; None: torch's)."""
    # Accelerate only forms a CPU process group when asked for the CPU (gloo backend).
    cpu = not torch.cuda.is_available()
    # The queue is identical on every process by construction: no need to broadcast buffers each step.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    handlers = [ddp] if dist_timeout is None else [ddp, InitProcessGroupKwargs(timeout=timedelta(seconds=dist_timeout))]
    return Accelerator(
        cpu=cpu,
        log_with=log_with,
        kwargs_handlers=handlers,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tb")),
    )


def train_transform(cfg: TrainConfig):
    if cfg.method == "supervised":
        t = data_lib.supervised_transform(cfg.image_size, cfg.crop_scale_min, cfg.hflip)
    else:
        t = data_lib.moco_v2_transform(
            cfg.image_size, cfg.crop_scale_min, cfg.blur_prob, cfg.hflip, cfg.jitter_hue, cfg.grayscale_prob
        )
    return data_lib.MultiView(t, num_views(cfg.method))


def train_loader(cfg: TrainConfig, base, sampler: data_lib.NeighborBatchSampler, device: torch.device):
    """The training DataLoader, and for ``--decode device`` the callable that turns its batches into views on
    ``device`` (:class:`scan_zoo.data.device.DeviceViews`; None for ``--decode cpu``). benchmarks/data.py uses it too.

    Its workers ignore the ``--preempt-signals`` (:func:`scan_zoo.train.interrupt.ignore_in_worker`): the
    training process decides when to stop, and a scheduler signals every process of the job."""
    transform = train_transform(cfg)
    pin = torch.device(device).type == "cuda"
    data_lib.cache_small_dataset(base)  # the digit scenes: decoded once per worker, not once per epoch
    if cfg.decode == "device":
        loader = data_lib.make_loader(
            device_data.EncodedViews(base, transform),
            sampler,
            cfg.num_workers,
            pin_memory=pin,
            collate_fn=device_data.collate_encoded,
        )
        views = device_data.DeviceViews(transform)
    else:
        loader = data_lib.make_loader(data_lib.SeededViews(base, transform), sampler, cfg.num_workers, pin_memory=pin)
        views = None
    signals = interrupt.parse_signals(cfg.preempt_signals)
    if signals and cfg.num_workers > 0:
        loader.worker_init_fn = interrupt.worker_init(signals)
    return loader, views


def eval_dataset(cfg: TrainConfig, base) -> data_lib.EvalImages:
    return data_lib.EvalImages(base, data_lib.eval_transform(cfg.image_size, cfg.eval_resize))


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak lr: linear warm-up, then half a cosine to zero (per step)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
