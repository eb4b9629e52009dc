#!/usr/bin/env python
"""Input pipeline against the model: can the DataLoader feed a training step? (issue 6, item 3)

    python benchmarks/data.py [--workers N] [--batch-size B] [--data IMAGEFOLDER] [--repeats 3] [--profile]

Everything is built by the engine's own functions (``Trainer``, whose loader comes from ``engine.train_loader``:
the same dataset, transforms, sampler, collate, workers, pin_memory, prefetch and persistent workers as a
training run). Interleaved repeats, in one run, of:

- ``loader``: images/s of a pass of the DataLoader (decode + two-crop MoCo-v2 augmentation in the workers), a
  new iterator over the persistent workers as every epoch makes one, no model; also its CPU time (the workers'
  and this process's) per image;
- ``step``:   images/s of the training step (forward, backward, SGD) on one batch already in memory on the
  training device: what the model can consume. On the CPU at the engine's thread count and at one thread: on a
  shared, oversubscribed machine two OpenMP threads can be many times slower than one, so the faster counts;
- ``steps fed by the loader``: both together, as in training (digits only; on a 2-core machine the workers and
  the step share the cores).

The digits ratio is reported twice: wall clock (loader against the faster step) and CPU cost (the workers'
CPU time per image against the one-thread step's, each worker and thread on a core of its own and the step
scaling perfectly over its threads: independent of what else runs on the machine, and conservative).

Two data sets:

1. the embedded default: the digit scenes with the pipeline's first stage, ``scan_zoo/recipes/digits_moco.yaml``
   (MoCo-v2, test_resnet, 128 images of 32 px per step; the SCAN stage has the same augmentation), and
   TrainConfig's defaults for the rest (2 workers, decode cpu). Target: loader / step >= 1.2.
2. an ImageNet-like JPEG ImageFolder (``--data``, or 256 photo-like 500x375 JPEGs written to a temporary
   folder) with ``scan_zoo/recipes/moco_v2_in1k.yaml`` (ResNet-50, 224 px, 32 per process): ``--decode cpu`` (PIL in the
   workers) and ``--decode device`` (workers read bytes; decoding and augmentation on the training device,
   timed there and added to the step). Without CUDA the device path runs on the CPU as a labelled reference
   and the GPU measurement is skipped.

Medians over the repeats; the ratios are printed last.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.2


def photo_like_jpegs(root: Path, n: int, size=(375, 500), classes: int = 8, quality: int = 90) -> Path:
    """``n`` JPEGs of ImageNet's typical size in ``root/train/<class>/``: smooth gradients, discs with hard edges
    and sensor-like noise, which compress (~50 kB at quality 90) and decode like photos (white noise would not;
    ImageNet's own average ~110 kB, so real files decode somewhat slower)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        d = root / "train" / f"class_{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        f = rng.uniform(0.5, 3.0, 6)
        img = np.stack(
            [
                120 + 80 * np.sin(f[0] * xx / 40 + f[1] * yy / 60 + i),
                120 + 80 * np.cos(f[2] * yy / 35 - f[3] * xx / 90),
                110 + 70 * np.sin(f[4] * (xx + yy) / 50) * np.cos(f[5] * xx / 25),
            ],
            -1,
        )
        for _ in range(6):  # objects with hard edges
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(15, 90)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 6, img.shape)  # texture / sensor noise
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=quality)
    return root


def make_trainer(recipe: str, overrides: dict):
    from scan_zoo.common.recipes import recipe_path
    from scan_zoo.train.config import build_config, load_yaml
    from scan_zoo.train.trainer import Trainer

    cfg = build_config(load_yaml(recipe_path(recipe)), overrides)
    return Trainer(cfg), cfg


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(batch: dict, device) -> dict:
    batch = dict(batch)
    batch.pop("skipped", None)
    return {k: ([t.to(device) for t in v] if k == "views" else v.to(device)) for k, v in batch.items()}


def step(trainer, batch: dict) -> None:
    """One optimiser step as in ``Trainer._train`` (without the logging)."""
    out = trainer.model(batch)
    trainer.acc.backward(out["loss"])
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def last_batches(sampler, epoch: int, batches: int) -> None:
    """Make the epoch's iterator yield only its last ``batches`` batches (the resume mechanism): a pass then ends
    by itself, leaving no prefetched batch for the next pass of the persistent workers to drain."""
    sampler.set_epoch(epoch, start_step=max(0, len(sampler) - batches))


def first_batch(loader, sampler):
    last_batches(sampler, 0, 1)
    return list(loader)[0]


def worker_pids(loader) -> list:
    """The persistent workers' process ids (DataLoader keeps its iterator, and the iterator its workers)."""
    return [w.pid for w in getattr(getattr(loader, "_iterator", None), "_workers", [])]


def cpu_seconds(pids) -> float:
    """User + system CPU seconds of processes so far (Linux /proc; 0 elsewhere)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of the line
    return total / os.sysconf("SC_CLK_TCK")


def time_loader(trainer, epoch: int, batches: int, loader=None) -> tuple[float, int, float, float]:
    """(seconds, images, seconds to the first batch, CPU seconds of the workers and this process) for a pass of
    ``batches`` batches, as each epoch makes one."""
    loader = loader or trainer.loader
    last_batches(trainer.sampler, epoch, batches)
    pids = worker_pids(loader)
    cpu0, own0 = cpu_seconds(pids), time.process_time()
    start, images, first = time.perf_counter(), 0, None
    for batch in loader:
        if first is None:
            first = time.perf_counter() - start
        images += len(batch["index"])
    secs = time.perf_counter() - start
    return secs, images, first, cpu_seconds(pids) - cpu0 + time.process_time() - own0


def time_steps(trainer, batch: dict, steps: int, cpu: bool = False):
    """Seconds per step (and, with ``cpu``, this process's CPU seconds per step too)."""
    device = trainer.acc.device
    sync(device)
    start, own0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(trainer, batch)
    sync(device)
    secs = (time.perf_counter() - start) / steps
    return (secs, (time.process_time() - own0) / steps) if cpu else secs


def time_train(trainer, epoch: int, steps: int) -> tuple[float, int]:
    """Steps fed by the loader, as in training: (seconds, images)."""
    device = trainer.acc.device
    last_batches(trainer.sampler, epoch, steps)
    start, images = time.perf_counter(), 0
    for batch in trainer.loader:
        if trainer.device_views is not None:
            batch = trainer.device_views(batch, device)
        batch = to_device(batch, device)
        step(trainer, batch)
        images += len(batch["index"])
    sync(device)
    return time.perf_counter() - start, images


def time_device_views(acc, device_views, cpu_batch: dict, repeats: int = 2) -> float:
    """Seconds per batch (best of ``repeats``) to decode and augment a collated ``--decode device`` batch on the device."""
    device = acc.device
    best = []
    for _ in range(repeats):
        batch = copy.copy(cpu_batch)  # DeviceViews pops its keys
        sync(device)
        start = time.perf_counter()
        device_views(batch, device)
        sync(device)
        best.append(time.perf_counter() - start)
    return min(best)


def profile_worker(trainer, samples: int, top: int = 12) -> str:
    """cProfile of the loader's per-sample work (what each worker does), in this process."""
    ds = trainer.loader.dataset
    items, step_ = [], 0
    while len(items) < samples:  # the elements (index, aug_seed, group) of the first steps
        items += trainer.sampler.batch(step_ % len(trainer.sampler))
        step_ += 1
    items = items[:samples]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for it in items:
        ds[it]
    prof.disable()
    per = (time.perf_counter() - start) / samples
    torch.set_num_threads(threads)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()][-top - 1 :]
    text = f"  {per * 1e3:.2f} ms per sample under cProfile; top {top} by own time:\n" + "\n".join(
        "    " + ln for ln in lines
    )
    return text + "\n" + transform_breakdown(ds, items)


def transform_breakdown(ds, items) -> str:
    """Wall time of loading and of each operation of the view transform, per sample, without the profiler."""
    import torch

    ops = ds.transform.transform.transforms if hasattr(ds.transform, "transform") else ds.transform.transforms
    names = ["load (decode / cache)"] + [
        type(op).__name__ + (f"({type(op.transforms[0]).__name__})" if hasattr(op, "transforms") else "") for op in ops
    ]
    spent = [0.0] * len(names)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for index, seed, _ in items:
        start = time.perf_counter()
        img, _ = ds.base[index]
        spent[0] += time.perf_counter() - start
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            for _ in range(ds.transform.n):
                x = img
                for k, op in enumerate(ops, 1):
                    start = time.perf_counter()
                    x = op(x)
                    spent[k] += time.perf_counter() - start
    torch.set_num_threads(threads)
    total = sum(spent)
    rows = [f"    {n:34s} {t / len(items) * 1e3:6.3f} ms  {t / total:5.1%}" for n, t in zip(names, spent)]
    return (
        f"  per sample ({ds.transform.n} views), one thread, no profiler: {total / len(items) * 1e3:.3f} ms\n"
        + "\n".join(rows)
    )


def median(xs):
    return statistics.median(xs)


def measure_digits(args) -> dict:
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="scan_zoo_data_bench_"))
    overrides = {"output_dir": str(tmp / "run"), "num_workers": args.workers}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    trainer, cfg = make_trainer("digits_moco.yaml", overrides)
    device = trainer.acc.device
    threads = torch.get_num_threads()
    print(
        f"== digit scenes (the embedded default): scan_zoo/recipes/digits_moco.yaml + TrainConfig defaults: {cfg.model}, "
        f"method {cfg.method}, batch {cfg.batch_size}, {cfg.image_size} px, {cfg.num_workers} workers, decode cpu, "
        f"device {device}; {len(trainer.train_base)} training images, {len(trainer.sampler)} steps per epoch"
    )
    trainer.model.train()
    batch = to_device(first_batch(trainer.loader, trainer.sampler), device)  # also starts the workers
    time_steps(trainer, batch, 1)  # warm-up
    if args.profile:
        print(profile_worker(trainer, 400))
    rows = {"loader": [], "loader_cpu": [], "first": [], "step": [], "step1": [], "step1_cpu": [], "train": []}
    batches = args.loader_batches or len(trainer.sampler)
    b = len(batch["index"])
    for r in range(args.repeats):
        secs, images, t_first, cpu = time_loader(trainer, r + 1, batches)
        rows["loader"].append(images / secs)
        rows["loader_cpu"].append(cpu / images)
        rows["first"].append(t_first)
        rows["step"].append(b / time_steps(trainer, batch, args.steps))
        torch.set_num_threads(
            1
        )  # an oversubscribed CPU can make one thread the faster; and no spinning in its CPU time
        secs, cpu = time_steps(trainer, batch, args.steps, cpu=True)
        torch.set_num_threads(threads)
        rows["step1"].append(b / secs)
        rows["step1_cpu"].append(cpu / b)
        secs, images = time_train(trainer, r + 1, args.steps)
        rows["train"].append(images / secs)
        print(
            f"  repeat {r + 1}: loader {rows['loader'][-1]:5.0f} img/s ({batches} batches, first after {t_first:.2f} s, "
            f"{rows['loader_cpu'][-1] * 1e3:.2f} CPU-ms/img)  step {rows['step'][-1]:5.0f} img/s with {threads} "
            f"threads, {rows['step1'][-1]:5.0f} with 1 ({rows['step1_cpu'][-1] * 1e3:.2f} CPU-ms/img)  steps fed by "
            f"the loader {rows['train'][-1]:5.0f} img/s",
            flush=True,
        )
    res = {k: median(v) for k, v in rows.items()}
    res.update(consume=max(res["step"], res["step1"]), threads=threads, workers=max(1, cfg.num_workers))
    # contention-free: each of the W workers and of the step's T threads on a core of its own, the step scaling
    # perfectly over its threads (an upper bound on consumption, so a conservative ratio)
    res["cpu_ratio"] = (res["workers"] / res["loader_cpu"]) / (threads / res["step1_cpu"])
    print(
        f"  median: loader {res['loader']:.0f} img/s ({res['loader_cpu'] * 1e3:.2f} CPU-ms/img); step "
        f"{res['step']:.0f} img/s with {threads} threads, {res['step1']:.0f} with 1 ({res['step1_cpu'] * 1e3:.2f} "
        f"CPU-ms/img); steps fed by the loader {res['train']:.0f} img/s"
    )
    return res


def measure_jpeg(args) -> dict:
    import dataclasses

    from scan_zoo.train.trainer import train_loader

    tmp = Path(tempfile.mkdtemp(prefix="scan_zoo_data_bench_"))
    if args.data:
        root, what = Path(args.data), args.data
    else:
        start = time.perf_counter()
        root = photo_like_jpegs(tmp / "jpegs", args.jpeg_images)
        files = sorted((root / "train").rglob("*.jpg"))
        kb = statistics.mean(f.stat().st_size for f in files) / 1e3
        what = (
            f"{len(files)} generated 500x375 JPEGs (mean {kb:.0f} kB, written in {time.perf_counter() - start:.1f} s)"
        )
    from scan_zoo.data.datasets import image_folder

    n = len(image_folder(root, "train").samples)
    overrides = {
        "output_dir": str(tmp / "run"),
        "num_workers": args.workers,
        "data": str(root),
        "queue_size": min(128, n - 1),
        "model": args.jpeg_model,
    }  # the recipe's 65536 needs ImageNet
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    trainer, cfg = make_trainer("moco_v2_in1k.yaml", overrides)
    dev = trainer.acc.device
    # the --decode device loader, built by the same function as the trainer's (one model serves both)
    dev_loader, dev_views = train_loader(
        dataclasses.replace(cfg, decode="device"), trainer.train_base, trainer.sampler, dev
    )
    where = "cuda" if dev.type == "cuda" else "the CPU (a reference: no GPU here)"
    print(
        f"== JPEG ImageFolder: {what}; scan_zoo/recipes/moco_v2_in1k.yaml: {cfg.model}, method {cfg.method}, batch "
        f"{cfg.batch_size}, {cfg.image_size} px, {cfg.num_workers} workers, device {dev}; decode cpu, and decode "
        f"device on {where}"
    )
    trainer.model.train()
    batch = to_device(first_batch(trainer.loader, trainer.sampler), dev)  # also starts the workers
    dev_batch = first_batch(dev_loader, trainer.sampler)
    dev_views(copy.copy(dev_batch), dev)  # warm-up
    if args.profile:
        print(profile_worker(trainer, 60))
    time_steps(trainer, batch, 1)  # warm-up
    rows = {"cpu": [], "device_loader": [], "step": [], "aug": []}
    batches = args.loader_batches or min(len(trainer.sampler), 8)
    for r in range(args.repeats):
        secs, images, _, _ = time_loader(trainer, r + 1, batches)
        rows["cpu"].append(images / secs)
        secs, images, _, _ = time_loader(trainer, r + 1, batches, dev_loader)
        rows["device_loader"].append(images / secs)
        rows["step"].append(time_steps(trainer, batch, args.jpeg_steps))
        rows["aug"].append(time_device_views(trainer.acc, dev_views, dev_batch))
        b = cfg.batch_size
        print(
            f"  repeat {r + 1}: decode cpu: loader {rows['cpu'][-1]:6.1f} img/s  | decode device: workers "
            f"{rows['device_loader'][-1]:6.1f} img/s, decode+augment on {dev.type} {b / rows['aug'][-1]:6.1f} img/s  "
            f"| step {b / rows['step'][-1]:6.2f} img/s",
            flush=True,
        )
    m = {k: median(v) for k, v in rows.items()}
    b = cfg.batch_size
    res = {
        "model": cfg.model,
        "batch": b,
        "workers": cfg.num_workers,
        "device": dev.type,
        "cpu_loader": m["cpu"],
        "step": b / m["step"],
        "device_loader": m["device_loader"],
        "device_aug": b / m["aug"],
        "step_with_aug": b / (m["step"] + m["aug"]),
    }
    print(
        f"  median: decode cpu loader {m['cpu']:.1f} img/s ({m['cpu'] / max(1, cfg.num_workers):.1f} per worker); "
        f"decode device: workers {m['device_loader']:.1f} img/s, decode+augment {b / m['aug']:.1f} img/s on "
        f"{dev.type}; step {b / m['step']:.2f} img/s, {b / (m['step'] + m['aug']):.2f} with decode+augment"
    )
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        help="an ImageFolder root (train/<class>/*.jpg) for the JPEG measurement "
        "(default: 256 generated 500x375 JPEGs in a temporary folder)",
    )
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: TrainConfig's, 2)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: each recipe's)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians are reported)")
    p.add_argument("--steps", type=int, default=5, help="digits: timed steps per repeat")
    p.add_argument(
        "--jpeg-steps", type=int, default=1, help="JPEG: timed steps per repeat (ResNet-50 on a CPU: ~10-30 s each)"
    )
    p.add_argument("--jpeg-images", type=int, default=256, help="generated JPEGs (without --data)")
    p.add_argument("--jpeg-model", default="resnet50", help="backbone of the JPEG measurement (the recipe's)")
    p.add_argument(
        "--loader-batches",
        type=int,
        default=None,
        help="batches per loader pass (default: digits one epoch, JPEG at most 8)",
    )
    p.add_argument("--skip-jpeg", action="store_true", help="only the digits")
    p.add_argument("--profile", action="store_true", help="print a cProfile of the workers' per-sample work")
    args = p.parse_args()

    import torch

    from scan_zoo.train.config import TrainConfig

    if args.workers is None:
        args.workers = TrainConfig.num_workers
    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CUDA: "
        f"{torch.cuda.get_device_name(0) if cuda else 'none'}",
        flush=True,
    )
    digits = measure_digits(args)
    jpeg = None if args.skip_jpeg else measure_jpeg(args)

    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    print(f"ratios loader / consumption (medians of {args.repeats} interleaved repeats):")
    d = digits
    wall = d["loader"] / d["consume"]
    ok = wall >= TARGET and d["cpu_ratio"] >= TARGET
    print(
        f"  digits, decode cpu, test_resnet, wall clock: {wall:.2f} ({d['loader']:.0f} img/s against the faster "
        f"step, {d['consume']:.0f} img/s; {d['loader'] / d['step']:.2f} against the step at {d['threads']} threads)"
    )
    print(
        f"  digits, decode cpu, test_resnet, CPU cost: {d['cpu_ratio']:.2f} ({d['workers']} workers at "
        f"{d['loader_cpu'] * 1e3:.2f} CPU-ms/img against {d['threads']} perfectly scaling threads at "
        f"{d['step1_cpu'] * 1e3:.2f} CPU-ms/img)"
    )
    print(f"  digits target >= {TARGET} (both): {'met' if ok else 'NOT met'}")
    if jpeg:
        j = jpeg
        on = "a GPU" if j["device"] == "cuda" else "this CPU"
        print(
            f"  JPEG 500x375, decode cpu, {j['model']} on {on}: {j['cpu_loader'] / j['step']:.2f} "
            f"({j['cpu_loader']:.1f} vs {j['step']:.2f} img/s; {j['cpu_loader'] / max(1, j['workers']):.1f} img/s "
            f"per worker)"
        )
        ratio = j["device_loader"] / j["step_with_aug"]
        if j["device"] == "cuda":
            print(
                f"  JPEG 500x375, decode device on cuda: {ratio:.2f} (workers {j['device_loader']:.1f} img/s vs step "
                f"with on-GPU decode+augment {j['step_with_aug']:.1f} img/s)"
            )
        else:
            print(
                f"  JPEG 500x375, decode device, run on the CPU (reference only): {ratio:.2f} (workers "
                f"{j['device_loader']:.1f} img/s vs step with decode+augment {j['step_with_aug']:.2f} img/s)"
            )
            print("  JPEG 500x375, decode device on a GPU: skipped (no CUDA device on this machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
