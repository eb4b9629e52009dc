"""Linear probing of a frozen backbone: MoCo's protocol, its fast cached variant, and kNN beside both.

The settings and transforms are :mod:`scan_zoo.eval.probe_config` (whose docstring states the protocols
and the choices made), the feature cache :mod:`scan_zoo.eval.probe_cache`, the linear layer and its
training :mod:`scan_zoo.eval.linear`. This module runs them:

- The frozen backbone runs under ``no_grad`` in eval mode: BN uses (and keeps) its running statistics.
  Gradients never reached it in main_lincls.py either, so the computation is the same.
- Validation features are computed once: the backbone is frozen and the centre crop deterministic, so
  validating each epoch is one matmul, identical to running the backbone again.
- Several processes: feature extraction is sharded by :func:`~scan_zoo.models.features.extract_features`;
  the linear layer is then trained in every process alike. For ``moco`` this repeats the training in each
  process (no DDP): simple and correct, not faster.
- Every CPU computation (extraction, linear layer, kNN) runs on :data:`~scan_zoo.eval.linear.PROBE_THREADS`
  threads: the same weights give the same numbers, to the bit, whatever the thread count.
- At the end every backbone weight and buffer is compared, bit for bit, with a copy taken before
  (main_lincls.py's sanity_check); a difference raises :class:`BackboneChanged`.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

from scan_zoo.common import distributed as dist_lib
from scan_zoo.common.errors import UserError
from scan_zoo.common.files import sha256_file
from scan_zoo.core import metrics as evaluation
from scan_zoo.data import datasets as data_lib
from scan_zoo.eval.linear import (  # noqa: F401  (re-exported: the probe's public names live here)
    LINEAR_DTYPE,
    PROBE_THREADS,
    cached_batches,
    classifier_accuracy,
    fit_linear,
    fixed_threads,
    lr_at,
    make_classifier,
    train_epoch,
    training_batches,
)
from scan_zoo.eval.probe_cache import (  # noqa: F401
    CACHE_FORMAT,
    CACHE_TENSORS,
    _bits,
    cache_key,
    centre_crop_features,
    default_cache_dir,
    files_digest,
    read_feature_cache,
    tensors_digest,
    weights_digest,
)
from scan_zoo.eval.probe_config import (  # noqa: F401
    DIGITS_CROP_SCALE_MIN,
    DIGITS_SIZE,
    IMAGENET_CROP_SCALE_MIN,
    KNN_K,
    KNN_TEMPERATURE,
    LINEAR_TOLERANCE,
    LR_DECAY,
    PROTOCOLS,
    ProbeConfig,
    eval_transform,
    load_splits,
    model_preprocessing,
    protocol_settings,
    resolve_config,
    train_transform,
)
from scan_zoo.models.backbones import check_input_size
from scan_zoo.models.loading import load_backbone

RESULTS_NAME = "eval_results.json"


class BackboneChanged(RuntimeError):
    """Linear probing modified the frozen backbone: a bug, never the user's input."""


# ------------------------------------------------------------------------------------ backbone check
# ------------------------------------------------------------------------------------ backbone check
def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every weight and buffer."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """main_lincls.py's sanity_check, bit for bit and buffers included: raise :class:`BackboneChanged`
    naming every weight or buffer that differs from ``before`` (NaNs compare by their bits)."""
    after = module.state_dict()
    changed = sorted(set(before) ^ set(after))
    changed += [
        k
        for k in before
        if k in after
        and (
            before[k].dtype != after[k].dtype
            or before[k].shape != after[k].shape
            or not torch.equal(_bits(before[k]), _bits(after[k]))
        )
    ]
    if changed:
        raise BackboneChanged(
            f"linear probing changed the frozen backbone: {changed[:10]}"
            + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
        )


# ------------------------------------------------------------------------------------------- protocols
def knn_accuracy(feats: dict, num_classes: int, cfg: ProbeConfig) -> dict:
    """kNN top-1/top-5 of the val features against the train features (``feats`` from
    :func:`centre_crop_features`), with ``cfg``'s k and temperature, on the probe's fixed thread count."""
    with fixed_threads():
        scores = evaluation.knn_classify(
            feats["train_features"],
            feats["train_labels"],
            feats["val_features"],
            num_classes,
            cfg.knn_k,
            cfg.knn_temperature,
        )  # [M, C]
        knn = evaluation.topk_accuracy(scores, feats["val_labels"])
    return {"top1": knn["top1"], "top5": knn["top5"], "k": cfg.knn_k, "temperature": cfg.knn_temperature}


def linear_probe(backbone: nn.Module, train, val, cfg: ProbeConfig, device="cpu") -> dict:
    """Run ``cfg.protocol`` (a resolved config, see :func:`resolve_config`) on ImageFolder splits.

    Returns ``{"protocol": settings, "top1", "top5" (last epoch), "knn": {...}, "history",
    "feature_cache": {"path", "hit"}, "feature_dim", "seconds"}``; raises :class:`BackboneChanged`
    if any backbone weight or buffer changed.
    """
    start = time.perf_counter()
    before = snapshot(backbone)
    was_training = backbone.training
    backbone.eval()
    requires_grad = {n: p.requires_grad for n, p in backbone.named_parameters()}
    backbone.requires_grad_(False)
    try:
        feats = centre_crop_features(backbone, train, val, cfg, device)
        dim, num_classes = feats["train_features"].shape[1], len(train.classes)
        with fixed_threads():
            _, history = fit_linear(
                training_batches(backbone, train, feats, cfg, device),
                dim,
                num_classes,
                feats["val_features"],
                feats["val_labels"],
                cfg,
                device,
            )
        knn = knn_accuracy(feats, num_classes, cfg)
    finally:
        backbone.train(was_training)
        for n, p in backbone.named_parameters():
            p.requires_grad_(requires_grad[n])
    assert_unchanged(backbone, before)
    last = history[-1]
    return {
        "protocol": protocol_settings(cfg),
        "top1": last["top1"],
        "top5": last["top5"],
        "knn": knn,
        "history": history,
        "feature_cache": {"path": feats["cache_path"], "hit": feats["cache_hit"]},
        "feature_dim": dim,
        "seconds": time.perf_counter() - start,
    }


def _load(model: str, data: str, cfg: ProbeConfig, arch: str | None, data_cache: str | None):
    """``(root, train, val, backbone, description, weights file or None, resolved cfg)``."""
    root = data_lib.resolve_data_root(data, data_cache, progress=cfg.progress and dist_lib.rank() == 0)
    train, val = load_splits(root)
    backbone, description = load_backbone(model, arch=arch)
    weights = Path(description) if Path(description).is_file() else None
    cfg = resolve_config(cfg, model_preprocessing(backbone, weights), data)
    check_input_size(backbone, cfg.image_size, description)
    return root, train, val, backbone, description, weights, cfg


def evaluate_knn(
    model: str,
    data: str,
    cfg: ProbeConfig | None = None,
    arch: str | None = None,
    data_cache: str | None = None,
    device="cpu",
) -> dict:
    """The kNN of :func:`evaluate_model` alone (same transform, same cached features, same k and T), for
    tables that show kNN only (the training pipeline's): the same weights give the same figure everywhere."""
    _, train, val, backbone, _, _, cfg = _load(model, data, cfg or ProbeConfig(), arch, data_cache)
    backbone = backbone.to(device).eval()
    with torch.no_grad():
        feats = centre_crop_features(backbone, train, val, cfg, device)
    return knn_accuracy(feats, len(train.classes), cfg)


def evaluate_model(
    model: str, data: str, cfg: ProbeConfig, arch: str | None = None, data_cache: str | None = None, device="cpu"
) -> dict:
    """Load ``model`` (anything :func:`scan_zoo.models.loading.load_backbone` accepts), probe it on ``data``
    (an ImageFolder root with train/ and val/, or ``digits``) and return the results with their provenance."""

    root, train, val, backbone, description, weights, cfg = _load(model, data, cfg, arch, data_cache)
    result = linear_probe(backbone.to(device), train, val, cfg, device)
    result.update(
        {
            "dataset": data,
            "data_root": str(root),
            "num_classes": len(train.classes),
            "train_images": len(train),
            "val_images": len(val),
            "model": model,
            "architecture": backbone.pretrained_cfg.get("architecture"),
            "weights": description,
        }
    )
    if weights is not None:
        result["weights_sha256"] = sha256_file(weights)
    result.update(
        {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "scan_zoo_version": version("scan-zoo"),
        }
    )
    return result


# --------------------------------------------------------------------------------------------- results
def results_path(model: str, out: str | None = None) -> Path:
    """``out``; else ``<model>/eval_results.json`` for a directory; else
    ``runs/eval/<sanitised model name>/eval_results.json``."""
    if out:
        return Path(out)
    if Path(model).is_dir():
        return Path(model) / RESULTS_NAME
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in model.strip("/.")) or "model"
    return Path("runs") / "eval" / name / RESULTS_NAME


def merge_results(path: Path, result: dict) -> dict:
    """Write ``result`` under its protocol's name into the JSON object at ``path``, keeping the other
    protocols' entries; atomically. Returns the whole object."""
    path = Path(path)
    merged = {}
    if path.is_file():
        try:
            merged = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"cannot add results to {path}: not valid JSON ({e})") from None
        if not isinstance(merged, dict):
            raise UserError(f"cannot add results to {path}: it holds no JSON object keyed by protocol")
    merged[result["protocol"]["name"]] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    os.replace(tmp, path)
    return merged
