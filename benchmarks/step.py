#!/usr/bin/env python
"""Training images/s of supervised, MoCo, SupCon and SCAN: same backbone, image size and global batch.

    python benchmarks/step.py [--model resnet18] [--image-size 64] [--batch 48] [--repeats 15]
    python benchmarks/step.py --profile scan        # torch.profiler table of a few steps of one method

Each method is the real class (:func:`scan_zoo.methods.build_method` from a :class:`scan_zoo.train.config.TrainConfig`)
taking real optimiser steps, as the engine does: forward (query encoder; for the contrastive methods the
momentum update, the key encoder's no-grad forward with split-BN and the logits over ``[batch keys ++
queue]``), backward, SGD step (momentum 0.9, weight decay), queue push. The queue has the ImageNet recipes'
65,536 keys. SCAN's batch comes from :class:`scan_zoo.data.datasets.NeighborBatchSampler` over a neighbour table:
``batch / (K + 1)`` anchors each followed by its K neighbours. Inputs are random tensors made once (the input
pipeline is ``benchmarks/data.py``'s subject), so only the step is timed.

Interleaved repeats: every repeat times ``--steps`` steps of each method in turn, the order rotating from
one repeat to the next; medians of the repeats.
Images/s counts images (a two-view image counts once). Ratios last; targets (issue 6): SCAN/MoCo >= 0.95,
MoCo/supervised >= 0.70.

``--clock cpu`` (with ``--threads 1``) divides by the process's CPU time instead of the wall clock: on a
machine shared with other jobs the wall clock of a step mostly measures how long it waited for a core,
the CPU time of a one-thread step measures the work it did.

``--device cuda`` with ``--channels-last``, ``--bf16`` (autocast) and ``--compile`` (torch.compile) is for a
GPU; without one those parts are skipped with a message.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

METHODS = ("supervised", "moco", "supcon", "scan")
NUM_IMAGES, NUM_CLASSES = 100_000, 1000  # the synthetic data set the batches index into


def build(method: str, args):
    """(model in train mode, SGD optimiser, batches) for one method; batches cycle over ``--steps`` steps."""
    import torch

    from scan_zoo.data.datasets import NeighborBatchSampler
    from scan_zoo.methods import build_method
    from scan_zoo.models.backbones import create_backbone
    from scan_zoo.train.config import TrainConfig

    cfg = TrainConfig(
        method=method,
        model=args.model,
        batch_size=args.batch,
        queue_size=args.queue_size,
        k=args.k,
        image_size=args.image_size,
    ).validate()
    torch.manual_seed(0)
    model = build_method(cfg, create_backbone(cfg.model), NUM_CLASSES).to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)

    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, NUM_CLASSES, (NUM_IMAGES,), generator=g)  # [N]
    if method == "scan":  # each image's K neighbours: other images of its class
        by_class = torch.argsort(labels, stable=True)
        rank = torch.empty_like(by_class)
        rank[by_class] = torch.arange(NUM_IMAGES)
        neighbors = by_class[(rank[:, None] + torch.arange(1, args.k + 1)) % NUM_IMAGES]  # [N, K]
        sampler = NeighborBatchSampler(NUM_IMAGES, args.batch // (args.k + 1), neighbors, seed=0)
    else:
        sampler = NeighborBatchSampler(NUM_IMAGES, args.batch, None, seed=0)
    views = 1 if method == "supervised" else 2
    batches = []
    for step, slots in zip(range(args.steps), iter(sampler)):
        index = torch.tensor([s[0] for s in slots])  # [B]
        batch = {
            "index": index,
            "label": labels[index],
            "group": torch.tensor([s[2] for s in slots]),
            "views": [torch.randn(len(slots), 3, args.image_size, args.image_size, generator=g) for _ in range(views)],
        }
        batch = {k: ([t.to(args.device) for t in v] if k == "views" else v.to(args.device)) for k, v in batch.items()}
        if args.channels_last:
            batch["views"] = [t.contiguous(memory_format=torch.channels_last) for t in batch["views"]]
        batches.append(batch)
    if args.compile:
        model = torch.compile(model)
    return model, opt, batches


def run_steps(model, opt, batches, args) -> int:
    """One optimiser step per batch, as :class:`scan_zoo.train.trainer.Trainer` takes it; returns the images seen."""
    import torch

    for batch in batches:
        with torch.autocast(device_type=args.device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return sum(len(b["index"]) for b in batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=48, help="global batch in images (SCAN: anchors x (K + 1))")
    p.add_argument("--k", type=int, default=2, help="SCAN's neighbours per anchor")
    p.add_argument("--queue-size", type=int, default=65536)
    p.add_argument("--steps", type=int, default=1, help="steps per method per repeat")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall clock, or this process's CPU time (needs --threads 1)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--channels-last", action="store_true", help="GPU: channels_last memory format")
    p.add_argument("--bf16", action="store_true", help="GPU: bf16 autocast")
    p.add_argument("--compile", action="store_true", help="GPU: torch.compile the method")
    p.add_argument("--profile", choices=METHODS, help="print a torch.profiler table of this method's steps and exit")
    args = p.parse_args()

    import torch

    if args.batch % (args.k + 1):
        raise SystemExit(f"--batch {args.batch} must be a multiple of K + 1 = {args.k + 1} (SCAN's groups)")
    gpu_only = [f for f in ("channels_last", "bf16", "compile") if getattr(args, f)]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU on this machine: the --device cuda measurement is skipped")
        return
    if args.device == "cpu" and gpu_only:
        print(f"--{', --'.join(f.replace('_', '-') for f in gpu_only)}: GPU options, skipped on the CPU")
        for f in gpu_only:
            setattr(args, f, False)
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        raise SystemExit("--clock cpu measures one CPU thread's work: use it with --threads 1 on the CPU")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = {m: build(m, args) for m in ((args.profile,) if args.profile else METHODS)}
    print(
        f"{args.model} at {args.image_size} px, global batch {args.batch} images, queue {args.queue_size}, "
        f"K = {args.k}, {args.device}, {torch.get_num_threads()} torch threads, {args.clock} clock"
        + (f", {', '.join(gpu_only)}" if args.device == "cuda" and gpu_only else "")
        + f", load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for run in runs.values():  # warm-up: allocator, oneDNN kernels
        run_steps(*run, args)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities, record_shapes=False) as prof:
            run_steps(*runs[args.profile], args)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return

    rates = {m: [] for m in runs}
    order = list(runs)
    for r in range(args.repeats):
        for m in order[r % len(order) :] + order[: r % len(order)]:
            run = runs[m]
            start = clock()
            images = run_steps(*run, args)
            rates[m].append(images / (clock() - start))
    print(f"{'method':12s} {'images/s':>9s}   (median of {args.repeats} x {args.steps} steps; min-max)")
    med = {m: statistics.median(r) for m, r in rates.items()}
    for m, r in rates.items():
        print(f"{m:12s} {med[m]:9.1f}   ({min(r):.1f}-{max(r):.1f})")
    print(f"load average {os.getloadavg()[0]:.1f}\n")
    for name, a, b, target in (
        ("SCAN/MoCo", "scan", "moco", 0.95),
        ("MoCo/supervised", "moco", "supervised", 0.70),
        ("SupCon/MoCo", "supcon", "moco", None),
    ):
        r = med[a] / med[b]
        verdict = f" (target >= {target}: {'met' if r >= target else 'NOT met'})" if target else " (no target)"
        print(f"ratio {name} images/s: {r:.3f}{verdict}")


if __name__ == "__main__":
    main()
