#!/usr/bin/env python
"""Loading a zoo weight through scan_zoo against plain timm loading the same safetensors file.

    python benchmarks/load.py [--repeats 15] [--fresh 5]

For every zoo entry with weights on this machine (the shipped ``*_digits``), and for ResNet-50, it times,
interleaved in one run:

- ``zoo``:   ``timm.create_model("<arch>.<tag>", pretrained=True)`` after ``import scan_zoo`` (the registry
  look-up, the sha256 check of the file, then timm's own loading);
- ``plain``: ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": path, "num_classes": 0})``
  on the same file, i.e. timm with no scan_zoo involvement.

No ResNet-50 weight is published, so this script makes ``resnet50.scan_in1k`` a published entry for its
own run: a random ResNet-50 backbone (94 MB) in a temporary Hugging Face cache at a made-up pinned
revision, recorded with its sha256 in a temporary lock file (``SCAN_ZOO_LOCK``; the package's own lock is
copied into it, never changed). Its ``zoo`` column is therefore the real path of a downloaded weight:
``hf_hub_download`` at the pinned revision (offline: the cache), the sha256 check, timm's loading.

Two measurements, medians, ratio zoo / plain (target <= 1.10, issue 6), printed last:

- ``in-process``: repeated loads in one process, interleaved. scan_zoo remembers a file it has checked
  (keyed by path, inode, size, mtime and ctime, :func:`scan_zoo.zoo.hub.verify_sha256`), so a repeated load
  costs no second hash;
- ``fresh process`` (``--fresh N``, default 5): the first ``create_model`` call in a new Python process
  (imports done, not timed), zoo and plain alternating; the case of a user who loads a model once.
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


R50 = "resnet50.scan_in1k"
R50_REPO, R50_REVISION = "scan-zoo/resnet50.scan_in1k", "0123456789abcdef0123456789abcdef01234567"


def publish_r50_locally(tmp: Path) -> Path:
    """A random ResNet-50 backbone as if ``R50`` had been published and downloaded: the Hugging Face cache
    layout under ``tmp/hf``, the sha256 in the lock file ``tmp/zoo_lock.json`` (made before ``import
    scan_zoo``, which registers the entry with timm as having weights). Returns the weights file."""
    import hashlib
    import json

    import timm
    from safetensors.torch import save_file

    snapshot = tmp / "hf" / f"models--{R50_REPO.replace('/', '--')}" / "snapshots" / R50_REVISION
    snapshot.mkdir(parents=True)
    path = snapshot / "model.safetensors"
    save_file(timm.create_model("resnet50", num_classes=0).state_dict(), str(path))
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    package_lock = Path(__file__).resolve().parents[1] / "scan_zoo" / "zoo_lock.json"
    lock = json.loads(package_lock.read_text()) if package_lock.is_file() else {}
    lock[R50] = {"hf_hub_id": R50_REPO, "revision": R50_REVISION, "sha256": digest}
    (tmp / "zoo_lock.json").write_text(json.dumps(lock, indent=2))
    return path


def first_load(kind: str, name: str, arch: str, path: str) -> None:
    """Child process of ``--fresh``: import, then time one ``create_model`` call; print the seconds."""
    import timm
    import torch

    torch.set_num_threads(1)
    if kind == "zoo":
        import scan_zoo  # noqa: F401  (registers the zoo's tags with timm)

        start = time.perf_counter()
        timm.create_model(name, pretrained=True)
    else:
        start = time.perf_counter()
        timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": path, "num_classes": 0})
    print(time.perf_counter() - start)


def main() -> None:
    import atexit
    import os
    import shutil
    import subprocess
    import sys

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--fresh", type=int, default=5, help="fresh processes per case and side (0: skip)")
    p.add_argument("--child", nargs=4, metavar=("KIND", "NAME", "ARCH", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return first_load(*args.child)

    tmp = Path(tempfile.mkdtemp(prefix="scan_zoo_load_"))
    atexit.register(shutil.rmtree, tmp, True)
    os.environ.update(SCAN_ZOO_LOCK=str(tmp / "zoo_lock.json"), HF_HUB_CACHE=str(tmp / "hf"), HF_HUB_OFFLINE="1")
    r50 = publish_r50_locally(tmp)

    import timm
    import torch

    import scan_zoo

    torch.set_num_threads(1)

    cases, files = [], {}
    for name in scan_zoo.list_models(with_weights=True):
        entry = scan_zoo.get_entry(name)
        path = entry.weights_dir / "model.safetensors" if entry.status == "shipped" else r50
        files[name] = (entry.arch, path)
        cases.append(
            (
                name,
                lambda n=name: timm.create_model(n, pretrained=True),
                lambda a=entry.arch, f=path: timm.create_model(
                    a, pretrained=True, pretrained_cfg_overlay={"file": str(f), "num_classes": 0}
                ),
            )
        )
    assert R50 in files, "the temporary lock did not make resnet50.scan_in1k a published entry"
    # a weight downloaded earlier is older than this; a file changed within the last VERIFIED_MIN_AGE_S is
    # hashed on every load (scan_zoo.zoo.hub.verify_sha256)
    time.sleep(max(0.0, r50.stat().st_ctime + scan_zoo.zoo.hub.VERIFIED_MIN_AGE_S + 0.5 - time.time()))

    times = {name: {"zoo": [], "plain": []} for name, *_ in cases}
    for name, zoo, plain in cases:  # warm-up: imports, file cache
        zoo(), plain()
    for r in range(args.repeats):  # the order of the cases, and of zoo and plain, changes every repeat
        for name, zoo, plain in cases[r % len(cases) :] + cases[: r % len(cases)]:
            for side, fn in (("zoo", zoo), ("plain", plain))[:: 1 if r % 2 else -1]:
                times[name][side].append(timed(fn))
    print(f"{'entry':32s} {'zoo (ms)':>10s} {'plain (ms)':>11s} {'ratio':>7s}   (median of {args.repeats})")
    ratios = []
    for name, t in times.items():
        z, pl = statistics.median(t["zoo"]), statistics.median(t["plain"])
        ratios.append((name, z / pl))
        print(f"{name:32s} {z * 1e3:10.1f} {pl * 1e3:11.1f} {z / pl:7.3f}")

    fresh = [n for n in files if n != R50][:1] + [R50] if args.fresh else []
    first = {name: {"zoo": [], "plain": []} for name in fresh}
    for _ in range(args.fresh):
        for name in fresh:
            for kind in ("zoo", "plain"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", kind, name, files[name][0], str(files[name][1])],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                first[name][kind].append(float(out.split()[-1]))
    if fresh:
        print(f"\nfirst load in a fresh process (median of {args.fresh} processes per side)")
        print(f"{'entry':32s} {'zoo (ms)':>10s} {'plain (ms)':>11s} {'ratio':>7s}")
    for name, t in first.items():
        z, pl = statistics.median(t["zoo"]), statistics.median(t["plain"])
        ratios.append((f"{name} (fresh process)", z / pl))
        print(f"{name:32s} {z * 1e3:10.1f} {pl * 1e3:11.1f} {z / pl:7.3f}")
    print()
    for name, r in ratios:
        print(f"ratio zoo/plain {name}: {r:.3f} (target <= 1.10: {'met' if r <= 1.10 else 'NOT met'})")


if __name__ == "__main__":
    main()
