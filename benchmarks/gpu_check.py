#!/usr/bin/env python
"""One-command check of a GPU machine (issue 16, item 4): at most ~8 minutes on one GPU.

    python benchmarks/gpu_check.py --out gpu_check.json           # prints the table for benchmarks/RESULTS.md
    python benchmarks/gpu_check.py --toy --out /tmp/toy.json      # the same code at toy size on the CPU

Sections (each ``measured``, ``skipped`` with its reason, or ``failed`` with the error):

- ``throughput``: training images/s of SCAN, MoCo and timm supervised (cross-entropy): the real method classes
  taking real SGD steps (``benchmarks/step.py``'s ``build``/``run_steps``), ResNet-50 at 224 px with bf16
  autocast and channels_last, interleaved repeats, medians; the ratio SCAN / supervised against the target 0.75.
- ``throughput_compile``: the same with ``torch.compile`` (a compile error is caught and reported).
- ``decode_cpu`` / ``decode_device``: ``--decode cpu`` (PIL in the loader workers) against ``--decode device``
  (workers read bytes; decode + augment on the GPU) on JPEGs written to a temporary folder
  (``benchmarks/data.py``'s functions; the MoCo-v2 recipe's loader).
- ``train_resume``: SCAN through the real ``train.py`` (subprocesses): an uninterrupted run, and the same run
  stopped half-way (``--stop-after-steps``) and resumed (``--resume latest``); losses finite, final checkpoint
  weights compared (bit-identical, or on a GPU within the stated tolerance for its nondeterminism). On a GPU
  the runs use bf16 (``ACCELERATE_MIXED_PRECISION``) and ``--deterministic`` (rerun without it, and then held to
  ``GPU_TOLERANCE``, when an op has no deterministic CUDA kernel: the JSON records the refusal).
- ``features`` / ``mining``: ``scan_zoo.models.features.extract_features`` images/s, and
  ``scan_zoo.core.neighbors.mine_neighbors`` (which computes on the CPU) against the per-class Gram products
  alone on the training device.

Without CUDA, or with ``--toy``: test_resnet, 32 px, a few steps, on the CPU; bf16, channels_last, compile
and device decoding are skipped with a reason.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import data as data_bench  # benchmarks/data.py
import step as step_bench  # benchmarks/step.py

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.75  # SCAN / supervised training images/s (issue 16)
GPU_TOLERANCE = 1e-3  # resume on a GPU: max |a - b| / max |a| over the weights, when not bit-identical
METHODS = ("scan", "moco", "supervised")


def sizes(toy: bool) -> dict:
    """Every size the check uses: the GPU setting, or the toy one."""
    if toy:
        return dict(
            model="test_resnet",
            image_size=32,
            batch=24,
            queue=256,
            steps=2,
            repeats=2,
            jpegs=16,
            jpeg_size=(48, 64),
            workers=1,
            train_steps=6,
            train_batch=24,
            feat_images=96,
            mine_n=2000,
            mine_classes=10,
            mine_dim=64,
        )
    return dict(
        model="resnet50",
        image_size=224,
        batch=384,
        queue=65536,
        steps=5,
        repeats=3,
        jpegs=512,
        jpeg_size=(375, 500),
        workers=min(8, os.cpu_count() or 1),
        train_steps=40,
        train_batch=96,
        feat_images=1024,
        mine_n=128_000,
        mine_classes=100,
        mine_dim=2048,
    )


def section(fn, *args) -> dict:
    """Run one section; an exception becomes ``failed`` with its last line (the traceback goes to stderr)."""
    start = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001 - a check reports what broke and goes on with the next one
        traceback.print_exc()
        out = {"status": "failed", "reason": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


# ------------------------------------------------------------------------------------------ throughput
def throughput(s: dict, gpu: bool, compile_: bool, deadline: float = math.inf) -> dict:
    """``deadline`` (perf_counter): compiling stops being worth it past it (the rest is skipped)."""
    import torch

    args = argparse.Namespace(
        model=s["model"],
        image_size=s["image_size"],
        batch=s["batch"],
        k=2,
        queue_size=s["queue"],
        steps=s["steps"],
        device="cuda" if gpu else "cpu",
        channels_last=gpu,
        bf16=gpu,
        compile=compile_,
    )
    runs, compile_s = {}, {}
    for m in METHODS:
        runs[m] = step_bench.build(m, args)
        start = time.perf_counter()
        step_bench.run_steps(*runs[m], args)  # warm-up (and the compilation)
        compile_s[m] = round(time.perf_counter() - start, 1)
        if time.perf_counter() > deadline and m != METHODS[-1]:
            return skipped(f"compiling {', '.join(compile_s)} took {sum(compile_s.values()):.0f} s: over the budget")
    rates = {m: [] for m in METHODS}
    for r in range(s["repeats"]):
        for m in METHODS[r % 3 :] + METHODS[: r % 3]:
            start = time.perf_counter()
            images = step_bench.run_steps(*runs[m], args)
            rates[m].append(images / (time.perf_counter() - start))
    med = {m: statistics.median(v) for m, v in rates.items()}
    ratio = med["scan"] / med["supervised"]
    out = {
        "status": "measured",
        "model": s["model"],
        "image_size": s["image_size"],
        "batch_images": s["batch"],
        "queue": s["queue"],
        "bf16": gpu,
        "channels_last": gpu,
        "compile": compile_,
        "images_per_s": {m: round(v, 1) for m, v in med.items()},
        "ratio_scan_supervised": round(ratio, 3),
        "target": TARGET,
        "met": ratio >= TARGET if gpu else None,
        "repeats": f"{s['repeats']} x {s['steps']} steps",
    }
    if compile_:
        out["first_steps_s"] = compile_s
    verdict = (
        f"target {TARGET}: {'met' if out['met'] else 'NOT met'}"
        if gpu
        else "toy size: the target is for ResNet-50 at 224 px on a GPU"
    )
    out["result"] = (
        f"SCAN {med['scan']:.0f}, MoCo {med['moco']:.0f}, supervised {med['supervised']:.0f} images/s; "
        f"SCAN/supervised **{ratio:.3f}** ({verdict})"
    )
    out["note"] = (
        f"{s['model']} {s['image_size']} px, {s['batch']} images/step, queue {s['queue']}, "
        + ("bf16, channels_last" if gpu else "CPU, fp32 (bf16 and channels_last: GPU only, skipped)")
        + (", compiled" if compile_ else "")
    )
    del runs
    if gpu:
        torch.cuda.empty_cache()
    return out


# -------------------------------------------------------------------------------------------- decoding
def jpeg_folder(tmp: Path, s: dict) -> Path:
    root = data_bench.photo_like_jpegs(tmp / "jpegs", s["jpegs"], size=s["jpeg_size"], classes=4)
    val = data_bench.photo_like_jpegs(tmp / "jpegs_val", 8, size=s["jpeg_size"], classes=4)
    shutil.move(str(val / "train"), str(root / "val"))
    return root


def decode(tmp: Path, root: Path, s: dict, gpu: bool) -> tuple[dict, dict]:
    from scan_zoo.train.trainer import train_loader

    overrides = {
        "output_dir": str(tmp / "decode_run"),
        "num_workers": s["workers"],
        "data": str(root),
        "queue_size": min(128, s["jpegs"] - 1),
        "model": s["model"],
    }
    if not gpu:
        overrides.update(image_size=s["image_size"], eval_resize=s["image_size"], batch_size=8)
    trainer, cfg = data_bench.make_trainer("moco_v2_in1k.yaml", overrides)
    batches = min(len(trainer.sampler), 16)
    data_bench.first_batch(trainer.loader, trainer.sampler)  # starts the workers
    cpu = []
    for r in range(2):
        secs, images, _, _ = data_bench.time_loader(trainer, r + 1, batches)
        cpu.append(images / secs)
    jpeg_kb = statistics.mean(f.stat().st_size for f in (root / "train").rglob("*.jpg")) / 1e3
    base = {
        "images": s["jpegs"],
        "jpeg": f"{s['jpeg_size'][1]}x{s['jpeg_size'][0]}, mean {jpeg_kb:.0f} kB",
        "batch": cfg.batch_size,
        "image_size": cfg.image_size,
        "workers": cfg.num_workers,
    }
    note = f"{s['jpegs']} JPEGs {base['jpeg']}, batch {cfg.batch_size}, {cfg.image_size} px, {cfg.num_workers} workers"
    out_cpu = {
        "status": "measured",
        **base,
        "loader_images_per_s": round(max(cpu), 1),
        "per_worker": round(max(cpu) / max(1, cfg.num_workers), 1),
        "note": note,
        "result": f"{max(cpu):.0f} images/s ({max(cpu) / max(1, cfg.num_workers):.0f} per worker)",
    }
    if not gpu:
        return out_cpu, skipped("--decode device decodes on the GPU: no CUDA device (or --toy)")
    dev = trainer.acc.device
    dev_loader, dev_views = train_loader(
        dataclasses.replace(cfg, decode="device"), trainer.train_base, trainer.sampler, dev
    )
    dev_batch = data_bench.first_batch(dev_loader, trainer.sampler)
    dev_views(copy.copy(dev_batch), dev)  # warm-up
    workers, aug = [], []
    for r in range(2):
        secs, images, _, _ = data_bench.time_loader(trainer, r + 1, batches, dev_loader)
        workers.append(images / secs)
        aug.append(cfg.batch_size / data_bench.time_device_views(trainer.acc, dev_views, dev_batch))
    pipeline = min(max(workers), max(aug))  # workers and the device work in parallel: the slower one bounds it
    return out_cpu, {
        "status": "measured",
        **base,
        "workers_read_images_per_s": round(max(workers), 1),
        "device_decode_augment_images_per_s": round(max(aug), 1),
        "pipeline_bound_images_per_s": round(pipeline, 1),
        "ratio_device_cpu": round(pipeline / max(cpu), 2),
        "note": note,
        "result": f"{pipeline:.0f} images/s (decode+augment on the GPU {max(aug):.0f}, workers reading "
        f"{max(workers):.0f}); device / cpu **{pipeline / max(cpu):.2f}**",
    }


# ------------------------------------------------------------------------------- train.py and resume
def train_py(run_dir: Path, root: Path, s: dict, gpu: bool, deterministic: bool, *extra: str):
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--method",
        "scan",
        "--data",
        str(root),
        "--appearance-model",
        str(ROOT / "scan_zoo" / "weights" / "test_resnet.moco_digits"),
        "--model",
        "test_resnet",
        "--image-size",
        "32",
        "--eval-resize",
        "32",
        "--batch-size",
        str(s["train_batch"]),
        "--queue-size",
        str(min(64, s["jpegs"] - 1)),
        "--k",
        "2",
        "--max-steps",
        str(s["train_steps"]),
        "--epochs",
        "100",
        "--lr",
        "0.03",
        "--num-workers",
        str(s["workers"] if gpu else 0),
        "--log-every-steps",
        "1",
        "--output-dir",
        str(run_dir),
        "--save-every-steps",
        str(s["train_steps"]),
        "--deterministic",
        str(deterministic).lower(),
        *extra,
    ]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
        "ACCELERATE_MIXED_PRECISION": "bf16" if gpu else "no",
        "CUDA_VISIBLE_DEVICES": "0" if gpu else "",
    }
    if not gpu:
        env["OMP_NUM_THREADS"] = "1"  # as torch.set_num_threads(1) here: a shared CPU runs one thread faster
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise TrainFailed(
            f"train.py {' '.join(extra) or '(uninterrupted)'} exited {r.returncode}: {r.stderr.strip()[-300:]}"
        )


class TrainFailed(RuntimeError):
    """A train.py subprocess of the resume check exited non-zero; the text ends with its stderr."""


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    from scan_zoo.train.checkpoints import list_checkpoints

    return load_file(str(list_checkpoints(run_dir)[-1] / "model.safetensors"))


def train_resume(tmp: Path, root: Path, s: dict, gpu: bool) -> dict:
    n = s["train_steps"]
    for deterministic in (True, False) if gpu else (False,):  # CPU: bit-exact either way
        start = time.perf_counter()
        try:
            train_py(tmp / "whole", root, s, gpu, deterministic)
        except TrainFailed as e:
            if deterministic and "determinis" in str(e):  # an op without a deterministic CUDA kernel
                shutil.rmtree(tmp / "whole", ignore_errors=True)
                refused = str(e)
                continue
            raise
        break
    whole_s = time.perf_counter() - start
    train_py(tmp / "halves", root, s, gpu, deterministic, "--stop-after-steps", str(n // 2))
    train_py(tmp / "halves", root, s, gpu, deterministic, "--resume", "latest")
    losses = [
        json.loads(ln)["loss"]
        for ln in (tmp / "whole" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(ln)
    ]
    a, b = final_weights(tmp / "whole"), final_weights(tmp / "halves")
    assert a.keys() == b.keys(), "the two runs' checkpoints hold different tensors"
    diff = max(((x.double() - b[k].double()).abs().max().item() for k, x in a.items() if x.numel()), default=0.0)
    scale = max((x.double().abs().max().item() for x in a.values() if x.numel() and x.is_floating_point()), default=1.0)
    identical = all(x.dtype == b[k].dtype and bool((x == b[k]).all()) for k, x in a.items())
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    within = identical or (gpu and diff / scale <= GPU_TOLERANCE)
    how = "bit-identical" if identical else f"max abs diff {diff:.2e} (relative {diff / scale:.1e})"
    return {
        "result": f"**{'passed' if finite and within else 'FAILED'}**: losses finite {finite}, resume {how}",
        "note": f"train.py SCAN, {n} steps, stopped at {n // 2}, {'cuda, bf16' if gpu else 'cpu, fp32'}",
        "status": "measured",
        "passed": finite and within,
        "device": "cuda" if gpu else "cpu",
        "precision": "bf16 autocast" if gpu else "fp32",
        "steps": n,
        "stopped_at": n // 2,
        "losses_logged": len(losses),
        "finite_losses": finite,
        "first_last_loss": [losses[0], losses[-1]],
        "bit_identical": identical,
        "max_abs_diff": diff,
        "relative_diff": diff / scale,
        "tolerance": "bit-identical" if not gpu else f"bit-identical, else relative {GPU_TOLERANCE}",
        "deterministic": deterministic,
        "uninterrupted_run_s": round(whole_s, 1),
        **({"deterministic_refused": refused[-300:]} if gpu and not deterministic else {}),
    }


# ------------------------------------------------------------------------------- features and mining
def features(s: dict, gpu: bool) -> dict:
    import torch

    from scan_zoo.models.backbones import create_backbone
    from scan_zoo.models.features import extract_features

    class Tensors(torch.utils.data.Dataset):  # (image, label, index), made once, in memory
        def __init__(self, n):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(n, 3, s["image_size"], s["image_size"], generator=g)  # [n, 3, H, W]

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], i % 10, i

    device = "cuda" if gpu else "cpu"
    backbone = create_backbone(s["model"]).to(device)
    ds = Tensors(s["feat_images"])
    extract_features(
        backbone, torch.utils.data.Subset(ds, range(64)), batch_size=64, num_workers=0, progress=False
    )  # warm-up
    best = []
    for _ in range(2):
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        feats, _ = extract_features(backbone, ds, batch_size=256, num_workers=0, progress=False)
        best.append(len(ds) / (time.perf_counter() - start))
    return {
        "result": f"{max(best):.0f} images/s",
        "note": f"extract_features, {s['model']} {s['image_size']} px, {device}, fp32",
        "status": "measured",
        "model": s["model"],
        "image_size": s["image_size"],
        "images": len(ds),
        "dim": feats.shape[1],
        "images_per_s": round(max(best), 1),
        "device": device,
        "precision": "fp32 (extract_features does not autocast)",
    }


def mining(s: dict, gpu: bool) -> dict:
    import numpy as np
    import torch

    from scan_zoo.core.neighbors import mine_neighbors

    n, c, d = s["mine_n"], s["mine_classes"], s["mine_dim"]
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((n, d), dtype=np.float32).astype(np.float16)  # [N, D], as the mining file holds
    labels = torch.from_numpy(np.repeat(np.arange(c), n // c))  # [N] ImageFolder order
    start = time.perf_counter()
    idx, _ = mine_neighbors(feats, labels, k=2)
    mine_s = time.perf_counter() - start
    assert (idx >= 0).all() and (labels[idx] == labels[:, None]).all(), "a neighbour outside its class"
    device = "cuda" if gpu else "cpu"
    x = torch.from_numpy(feats).to(device).float()
    x = x / x.norm(dim=1, keepdim=True)
    m = n // c
    for rep in range(2):  # the per-class Gram products alone: what a mining on this device could not go below
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for k in range(c):
            a = x[k * m : (k + 1) * m]
            torch.topk(a @ a.T, 3, dim=1)
        if gpu:
            torch.cuda.synchronize()
        floor_s = time.perf_counter() - start
    return {
        "result": f"mine_neighbors {mine_s:.2f} s; Gram + top-k floor on {device} {floor_s:.3f} s",
        "note": f"{n} x {d} float16, {c} classes of {m}, K 2; mine_neighbors computes on the CPU",
        "status": "measured",
        "features": f"{n} x {d} float16, {c} classes of {m}",
        "k": 2,
        "mine_neighbors_s": round(mine_s, 2),
        "mine_neighbors_device": "cpu (scan_zoo.core.neighbors)",
        "gram_topk_floor_s": round(floor_s, 3),
        "floor_device": device,
        "ratio_mine_floor": round(mine_s / max(floor_s, 1e-9), 1),
        "threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------- report
def table(res: dict) -> str:
    """The table for benchmarks/RESULTS.md: each section's ``result`` and ``note``, or why it was not measured."""
    rows = ["| check | result | note |", "|---|---|---|"]
    for name, t in res["sections"].items():
        measured = t["status"] == "measured"
        result, note = (t["result"], t["note"]) if measured else (t["status"], t["reason"])
        rows.append(f"| {name} | {result} | {note} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="gpu_check.json", help="JSON file written")
    p.add_argument("--toy", action="store_true", help="toy sizes on the CPU, even when a GPU is there")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    p.add_argument(
        "--budget",
        type=float,
        default=360.0,
        help="seconds: sections not started by then are skipped; compiling stops (default 360)",
    )
    args = p.parse_args()

    import torch

    t0 = time.perf_counter()
    gpu = torch.cuda.is_available() and not args.toy
    s = sizes(not gpu)
    if not gpu:
        # on a shared CPU machine two OpenMP threads can be many times slower than one (benchmarks/RESULTS.md)
        torch.set_num_threads(1)
        step_bench.NUM_IMAGES = 3000  # the synthetic set SCAN's neighbour batches index into (100,000 on a GPU)
    machine = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "toy": not gpu,
        "why_toy": None if gpu else ("--toy" if args.toy else "torch.cuda.is_available() is false"),
    }
    print(
        f"gpu_check: {'GPU ' + machine['gpu'] if gpu else 'toy sizes on the CPU (' + machine['why_toy'] + ')'}; "
        f"torch {torch.__version__}",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="scan_zoo_gpu_check_"))
    sec = {}

    def run(name, fn, *a):
        if time.perf_counter() - t0 > args.budget:
            sec[name] = skipped(f"time budget of {args.budget:.0f} s spent before this section")
        else:
            sec[name] = section(fn, *a)
        print(
            f"  {name}: {sec[name]['status']} ({sec[name].get('seconds', 0)} s)"
            + (f": {sec[name]['reason']}" if "reason" in sec[name] else ""),
            flush=True,
        )

    try:
        run("throughput", throughput, s, gpu, False)
        root = jpeg_folder(tmp, s)
        run("decode", lambda: dict(zip(("status", "cpu", "device"), ("measured", *decode(tmp, root, s, gpu)))))
        both = sec.pop("decode")
        if both["status"] == "measured":
            sec["decode_cpu"], sec["decode_device"] = both["cpu"], both["device"]
        else:  # failed or skipped as a whole
            sec["decode_cpu"], sec["decode_device"] = both, dict(both)
        run("train_resume", train_resume, tmp, root, s, gpu)
        run("features", features, s, gpu)
        run("mining", mining, s, gpu)
        if not gpu:  # last: compiling three ResNet-50 methods takes minutes
            sec["throughput_compile"] = skipped("torch.compile is a GPU measurement here (no CUDA device, or --toy)")
        elif args.no_compile:
            sec["throughput_compile"] = skipped("--no-compile")
        else:
            run("throughput_compile", throughput, s, gpu, True, t0 + args.budget)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {
        "machine": machine,
        "sizes": s,
        "sections": sec,
        "skipped": {k: v["reason"] for k, v in sec.items() if v["status"] != "measured"},
        "total_s": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(
        f"\n{machine['date']}, {machine['gpu'] or 'CPU (toy sizes)'}, torch {machine['torch']}, "
        f"`python benchmarks/gpu_check.py{' --toy' if args.toy else ''}` ({res['total_s']:.0f} s)\n"
    )
    print(table(res))
    if res["skipped"]:
        print("\nnot measured:")
        for k, v in res["skipped"].items():
            print(f"  {k}: {sec[k]['status']}: {v}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
