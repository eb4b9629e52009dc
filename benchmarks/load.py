#!/usr/bin/env python
"""Loading a zoo weight through scan_zoo against plain timm loading the same safetensors file.

    python benchmarks/load.py [--repeats 15]

For every zoo entry with weights on this machine (the shipped ``*_digits``), and for a ResNet-50 backbone
exported to a temporary folder, it times, interleaved in one run:

- ``zoo``:   ``timm.create_model("<arch>.<tag>", pretrained=True)`` after ``import scan_zoo`` (the registry
  look-up, the sha256 check of the file, then timm's own loading);
- ``plain``: ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": path, "num_classes": 0})``
  on the same file, i.e. timm with no scan_zoo involvement.

The ResNet-50 is not a zoo entry with weights here (none is published), so its ``zoo`` column is plain
timm plus scan_zoo's sha256 check of the 100 MB file, the only work the zoo path adds for a downloaded
(already cached) weight. Medians of interleaved repeats; the ratio zoo / plain is printed last
(target <= 1.10, issue 6).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    import timm
    import torch

    import scan_zoo
    from scan_zoo.hub import sha256_file
    from scan_zoo.models import create_backbone, data_config_for, export_backbone

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(1)

    cases = []
    for name in scan_zoo.list_models(with_weights=True):
        entry = scan_zoo.get_entry(name)
        if entry.status == "shipped":
            path = entry.weights_dir / "model.safetensors"
            cases.append((name, lambda n=name: timm.create_model(n, pretrained=True),
                          lambda a=entry.arch, f=path: timm.create_model(
                              a, pretrained=True, pretrained_cfg_overlay={"file": str(f), "num_classes": 0})))
    tmp = Path(tempfile.mkdtemp(prefix="scan_zoo_load_"))
    export_backbone(create_backbone("resnet50"), tmp, data_config_for(224, 256, scan_zoo.registry.IMAGENET_MEAN,
                                                                       scan_zoo.registry.IMAGENET_STD), {})
    r50 = tmp / "model.safetensors"

    def plain_r50():
        return timm.create_model("resnet50", pretrained=True, pretrained_cfg_overlay={"file": str(r50), "num_classes": 0})

    def zoo_r50():
        sha256_file(r50)
        return plain_r50()

    cases.append(("resnet50 (sha256 + plain)", zoo_r50, plain_r50))
    if not cases:
        print("no zoo weights on this machine: run `scan-zoo build-digits` first")
        return

    times = {name: {"zoo": [], "plain": []} for name, *_ in cases}
    for name, zoo, plain in cases:  # warm-up: imports, file cache
        zoo(), plain()
    for _ in range(args.repeats):
        for name, zoo, plain in cases:
            times[name]["zoo"].append(timed(zoo))
            times[name]["plain"].append(timed(plain))
    print(f"{'entry':32s} {'zoo (ms)':>10s} {'plain (ms)':>11s} {'ratio':>7s}   (median of {args.repeats})")
    ratios = []
    for name, t in times.items():
        z, pl = statistics.median(t["zoo"]), statistics.median(t["plain"])
        ratios.append((name, z / pl))
        print(f"{name:32s} {z * 1e3:10.1f} {pl * 1e3:11.1f} {z / pl:7.3f}")
    print()
    for name, r in ratios:
        print(f"ratio zoo/plain {name}: {r:.3f} (target <= 1.10: {'met' if r <= 1.10 else 'NOT met'})")


if __name__ == "__main__":
    main()
