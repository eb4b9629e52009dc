#!/usr/bin/env python
"""The fast linear probe against MoCo's: top-1 agreement and speed, on the digit scenes by default.

    python benchmarks/linear_protocols.py runs/scan_zoo/scan
    python benchmarks/linear_protocols.py hf-hub:timm/test_resnet.r160_in1k --data digits

Runs the `cached` and the `moco` protocol (scan_zoo.eval.probe) one after the other with their real
settings (100 epochs, SGD lr 30, lr x0.1 at 60 and 80, batch 256), each from a cold feature cache so
that the cached protocol's time includes its one feature extraction. Prints both top-1s, their
difference and, last, the speed ratio moco_time / cached_time (protocol wall time: extraction,
training, kNN and the backbone check; loading the model and listing the data are not counted).
Targets: |top-1 difference| <= 1.5 points, cached >= 20x faster.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

AGREEMENT_POINTS = 1.5
MIN_SPEEDUP = 20.0


def build_parser() -> argparse.ArgumentParser:
    from scan_zoo.eval.probe import ProbeConfig

    d = ProbeConfig()
    p = argparse.ArgumentParser(
        prog="linear_protocols.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help="run/export directory, checkpoint directory, .safetensors file or timm/zoo name")
    p.add_argument("--data", default="digits", help="ImageFolder root with train/ and val/, or 'digits' (default)")
    p.add_argument("--data-cache", help="where 'digits' is rendered")
    p.add_argument("--arch", help="architecture of a weights file without config.json")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"both protocols (default: {d.epochs}, MoCo's)")
    p.add_argument(
        "--crop-scale-min",
        type=float,
        help="moco protocol's RandomResizedCrop lower scale (default: 0.08, MoCo's; 0.5 on digits)",
    )
    p.add_argument("--num-workers", type=int, default=d.num_workers, help=f"(default: {d.num_workers})")
    p.add_argument("--out", help="also write both results to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    from scan_zoo.common.errors import UserError
    from scan_zoo.eval.probe import ProbeConfig, evaluate_model

    parser = build_parser()
    args = parser.parse_args(argv)
    results = {}
    try:
        for protocol in ("cached", "moco"):
            with tempfile.TemporaryDirectory(prefix=f"probe-{protocol}-") as cold_cache:
                cfg = ProbeConfig(
                    protocol=protocol,
                    epochs=args.epochs,
                    num_workers=args.num_workers,
                    crop_scale_min=args.crop_scale_min,
                    cache_dir=cold_cache,
                ).validate()
                results[protocol] = evaluate_model(
                    args.model, args.data, cfg, arch=args.arch, data_cache=args.data_cache
                )
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    cached, moco = results["cached"], results["moco"]
    print(
        f"\n{args.model} on {args.data}: {cached['train_images']} train / {cached['val_images']} val images, "
        f"{cached['num_classes']} classes, {cached['feature_dim']}-d features"
    )
    print(f"{'protocol':<9}{'epochs':>7}{'top-1':>8}{'top-5':>8}{'kNN top-1':>11}{'seconds':>10}  train transform")
    for name, r in results.items():
        print(
            f"{name:<9}{r['protocol']['epochs']:>7}{r['top1']:>8.2f}{r['top5']:>8.2f}{r['knn']['top1']:>11.2f}"
            f"{r['seconds']:>10.1f}  {r['protocol']['train_transform']}"
        )
    diff = moco["top1"] - cached["top1"]
    ratio = moco["seconds"] / cached["seconds"]
    print(
        f"top-1 cached {cached['top1']:.2f}, moco {moco['top1']:.2f}, difference (moco - cached) {diff:+.2f} points"
        f" (target |difference| <= {AGREEMENT_POINTS}: {'met' if abs(diff) <= AGREEMENT_POINTS else 'NOT met'})"
    )
    print(
        f"speed ratio moco_time / cached_time = {moco['seconds']:.1f} s / {cached['seconds']:.1f} s = {ratio:.1f}x"
        f" (target >= {MIN_SPEEDUP:.0f}x: {'met' if ratio >= MIN_SPEEDUP else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
