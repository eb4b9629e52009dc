"""The feature cache of the cached protocol: centre-crop features of both splits, keyed by everything they
depend on (weights, file lists, transform), stored with the sha256 of their bytes and never used unverified."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from scan_zoo.common import distributed as dist_lib
from scan_zoo.data import datasets as data_lib
from scan_zoo.eval.linear import fixed_threads
from scan_zoo.eval.probe_config import ProbeConfig, eval_transform
from scan_zoo.models import features as features_lib

logger = logging.getLogger("scan_zoo.eval.probe")  # the name docs/robustness.md quotes in its warning

CACHE_FORMAT = 2  # bump when what a cache file holds changes


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def weights_digest(module: nn.Module) -> str:
    """sha256 over every weight and buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        h.update(_bits(t).numpy().tobytes())
    return h.hexdigest()


def files_digest(ds) -> str:
    """sha256 over an ImageFolder's classes and files (relative path, label, size, mtime): no pixels read."""
    h = hashlib.sha256(os.fsencode("\n".join(ds.classes)))  # names as their bytes: any may be non-UTF-8
    for path, label in ds.samples:
        st = os.stat(path)
        rel = Path(path).relative_to(ds.root).as_posix()
        h.update(os.fsencode(f"{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n"))
    return h.hexdigest()


def cache_key(backbone: nn.Module, train, val, cfg: ProbeConfig) -> tuple[str, dict]:
    """``(sha256 hex, what it hashes)``: weights, both splits' file lists and the centre-crop settings."""
    what = {
        "format": CACHE_FORMAT,
        "weights": weights_digest(backbone),
        "train": files_digest(train),
        "val": files_digest(val),
        "image_size": cfg.image_size,
        "eval_resize": cfg.eval_resize,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "interpolation": "bilinear",
        "features": "pooled, eval mode, float32",
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest(), what


def default_cache_dir() -> Path:
    base = os.environ.get("SCAN_ZOO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "scan_zoo")
    return Path(base) / "features"


def _everyone(flag: bool, device) -> bool:
    """True only if ``flag`` holds in every process (one process: ``flag``)."""
    return all(dist_lib.gather_sizes(int(flag), torch.device(device)))


CACHE_TENSORS = ("train_features", "train_labels", "val_features", "val_labels")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors (sorted names, dtypes, shapes, bytes): what a cache file's contents must hash to."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        h.update(_bits(t).numpy().tobytes())
    return h.hexdigest()


def read_feature_cache(path: Path, what: dict) -> tuple[dict | None, str | None]:
    """``(tensors, None)`` if ``path`` holds the features ``what`` describes, byte for byte as written;
    else ``(None, why not)``. The file records ``what`` and the sha256 of its tensors, both compared here:
    a file renamed, copied from another run, edited or damaged is never taken for the features it claims."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated, not safetensors, unreadable: the reason goes into the log line
        return None, f"unreadable ({e})"
    try:
        recorded = json.loads(meta.get("scan_zoo_feature_cache", ""))
    except ValueError:
        recorded = None
    if recorded != what:
        return None, "it records other weights, data or settings than the ones it is named after"
    if sorted(tensors) != sorted(CACHE_TENSORS):
        return None, f"it holds {sorted(tensors)}, not {list(CACHE_TENSORS)}"
    if meta.get("tensors_sha256") != tensors_digest(tensors):
        return None, "its tensors' sha256 differs from the one recorded when it was written (the file changed)"
    return tensors, None


def centre_crop_features(backbone: nn.Module, train, val, cfg: ProbeConfig, device="cpu") -> dict:
    """Centre-crop features of both splits, from the cache when it holds them, else extracted and cached.

    Returns ``{"train_features" float32 [N, D], "train_labels" int64 [N], "val_features" [M, D],
    "val_labels" [M], "cache_path": str, "cache_hit": bool}``. The cache file is
    ``<cache_dir>/<cache_key>.safetensors``, written atomically by the main process, with the key's inputs
    and its tensors' sha256 in its metadata; a file that fails :func:`read_feature_cache` is recomputed
    (one warning line says why), never used.
    """
    key, what = cache_key(backbone, train, val, cfg)
    path = Path(cfg.cache_dir or default_cache_dir()) / f"{key}.safetensors"
    tensors = None
    if _everyone(path.is_file(), device):  # every process must take the same branch (extraction is collective)
        tensors, problem = read_feature_cache(path, what)
        if problem:
            logger.warning("feature cache %s not used, recomputing the features: %s", path, problem)
    hit = _everyone(tensors is not None, device)
    if not hit:
        tf = eval_transform(cfg)
        tensors = {}
        for split, ds in (("train", train), ("val", val)):
            with fixed_threads():  # the features' bits must not depend on the thread count
                f, y = features_lib.extract_features(
                    backbone,
                    data_lib.EvalImages(ds, tf),
                    cfg.extract_batch_size,
                    cfg.num_workers,
                    device,
                    desc=f"{split} features",
                    progress=cfg.progress,
                )
            tensors[f"{split}_features"], tensors[f"{split}_labels"] = f.contiguous(), y.contiguous()  # [N, D], [N]
        if dist_lib.rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file(
                tensors,
                str(tmp),
                metadata={"scan_zoo_feature_cache": json.dumps(what), "tensors_sha256": tensors_digest(tensors)},
            )
            os.replace(tmp, path)
    return {**tensors, "cache_path": str(path), "cache_hit": hit}
