"""One config object for training: a dataclass, filled from defaults <- YAML recipe <- command line.

The resolved config is written into every run directory and every checkpoint, so a run can be
rebuilt from its files alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError

METHODS = ("pipeline", "supervised", "moco", "supcon", "scan", "dsc")


@dataclass
class TrainConfig:
    """Everything a training run depends on. Field comments are the command-line help."""

    # what to train
    method: str = "pipeline"  # pipeline (MoCo-v2 -> mining -> SCAN), supervised, moco, supcon, scan or dsc
    model: str = "test_resnet"  # any timm architecture, built with num_classes=0
    data: str = "digits"  # an ImageFolder root (with train/ and val/) or 'digits' (the embedded digit scenes)
    data_cache: Optional[str] = None  # where 'digits' is rendered (default: ~/.cache/scan_zoo/digits)
    output_dir: str = "runs/scan_zoo"  # run directory (the pipeline puts one sub-directory per stage in it)

    # schedule
    epochs: int = 20  # training epochs
    max_steps: Optional[int] = None  # cap on optimiser steps; also shortens the lr schedule
    batch_size: int = 128  # images per process per step (SCAN: anchors x (K + 1))
    lr: float = 0.06  # peak learning rate for the global batch given
    sgd_momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # SGD weight decay
    warmup_epochs: float = 0.0  # linear warm-up before the cosine decay
    seed: int = 0  # seeds the sampler, augmentation and initialisation

    # contrastive methods
    temperature: float = 0.2  # tau in s_ij = q_i . k_j / tau
    queue_size: int = 4096  # L, keys kept in the queue; must be smaller than the training set
    key_momentum: float = 0.99  # m in theta_k <- m theta_k + (1 - m) theta_q
    proj_dim: int = 128  # output size of the MLP projection head
    shuffle_bn: bool = True  # MoCo's shuffle-BN for the key encoder (across processes, or split-BN in one)
    key_bn_splits: int = 2  # one process: sub-batches the shuffled key batch is encoded in

    # SCAN
    k: int = 2  # K, positive neighbours per image; -1 = every same-class image (SupCon limit)
    neighbors: Optional[str] = None  # neighbour table from `scan-zoo mine` (stage 1)
    appearance_model: Optional[str] = None  # label-free model to mine neighbours with, if no table is given
    init_from: Optional[str] = None  # label-free weights to initialise from (default: appearance_model)
    denominator: str = "all"  # 'all' (degenerates to MoCo/SupCon) or 'negatives' (Eq. 6 read literally)
    in_batch_negatives: bool = True  # other pseudo-classes in the batch are negatives (Eq. 6)

    # DSC (Dense Semantic Contrast, label-free; the abstract gives no value: each default says why it is this one)
    dsc_feature_layer: Optional[int] = None  # dense terms' map: index into the backbone's feature_info (-1 = last, DSC's); default: the deepest map >= 4x4 at image_size (ResNet-50 at 224: the last; test_resnet at 32 px: layer2, its last is 1x1)
    dsc_dense_dim: int = 128  # output channels of the dense 1x1-conv head (DenseCL's 128, as the global head)
    dsc_queue_size: Optional[int] = None  # dense-queue length (one entry per image: its mean dense key); default queue_size, as in DenseCL
    dsc_topk: int = 1  # positives per query pixel: the k key pixels of most similar backbone feature (1 = DenseCL's argmax)
    dsc_assign: str = "kmeans"  # pixel categories: 'kmeans' (DSC-KM; default, no extra parameters) or 'prototypes' (DSC-PM, Sinkhorn)
    dsc_clusters: int = 16  # pixel categories per step; far fewer than a batch's images, so categories span images (digits: 10 + ground)
    dsc_kmeans_iters: int = 10  # DSC-KM Lloyd iterations, fixed (no convergence test: same result on every process and resume)
    dsc_sinkhorn_iters: int = 3  # DSC-PM Sinkhorn-Knopp iterations (SwAV's 3)
    dsc_sinkhorn_eps: float = 0.05  # DSC-PM entropy regularisation of the balanced assignment (SwAV's 0.05)
    dsc_pixel_samples: int = 512  # query pixels per process in the category loss; bounds its S x (S x processes) logits
    dsc_weight_instance: float = 1.0  # weight of the instance (MoCo-v2) term; 1 so DSC with both dense weights 0 is MoCo
    dsc_weight_pixel: float = 1.0  # weight of the pixel term; DenseCL weighs its dense term equal to its global one
    dsc_weight_category: float = 1.0  # weight of the pixel-category term; no published value, so equal to the others

    # images and augmentation (MoCo-v2, sizes scaled to image_size)
    image_size: int = 32  # training crop size
    eval_resize: Optional[int] = None  # resize before the centre crop for evaluation (default: image_size / 0.875)
    crop_scale_min: float = 0.2  # RandomResizedCrop lower scale
    blur_prob: float = 0.5  # probability of Gaussian blur
    jitter_hue: float = 0.1  # ColorJitter hue (MoCo-v2: 0.1; 0.5 turns hue fully random)
    grayscale_prob: float = 0.2  # probability of RandomGrayscale
    hflip: bool = True  # random horizontal flip

    # machinery
    strict_data: bool = False  # decode every training image first and stop at the first unreadable one
    skip_nonfinite: int = 0  # steps with a NaN/inf loss to skip (each logged, no optimiser step) before stopping
    num_workers: int = 2  # DataLoader workers per process
    decode: str = "cpu"  # where training images are decoded and augmented: 'cpu' (PIL in the loader workers) or 'device' (torchvision.io + batched tensor ops on the training device; non-JPEG files are decoded by the workers)
    log_every_steps: int = 10  # log metrics every this many steps
    save_every_epochs: int = 1  # checkpoint every this many epochs (and at the end)
    save_every_steps: Optional[int] = None  # also checkpoint every this many steps
    keep_checkpoints: int = 2  # complete checkpoints kept; older ones are pruned after a new one is complete
    stop_after_steps: Optional[int] = None  # checkpoint and exit after this many steps (preemption); schedule unchanged
    resume: Optional[str] = None  # 'latest' or a checkpoint directory
    deterministic: bool = False  # torch deterministic algorithms (bit-exact resume on CPU is exact either way)
    knn_k: int = 20  # kNN evaluation: neighbours
    knn_temperature: float = 0.07  # kNN evaluation: vote weight exp(sim / T)
    resume_override: Optional[str] = None  # with --resume: comma-separated fields (or 'data') allowed to differ from the checkpoint's run, e.g. lr,epochs

    def validate(self) -> "TrainConfig":
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.denominator not in ("all", "negatives"):
            raise UserError(f"denominator must be 'all' or 'negatives', not {self.denominator!r}")
        for name in ("batch_size", "epochs", "queue_size", "proj_dim", "image_size", "log_every_steps",
                     "save_every_epochs", "keep_checkpoints", "key_bn_splits", "knn_k",
                     "dsc_dense_dim", "dsc_topk", "dsc_kmeans_iters", "dsc_sinkhorn_iters", "dsc_pixel_samples",
                     "dsc_queue_size", "max_steps", "save_every_steps", "stop_after_steps"):  # the last four may be unset
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, not {value}")
        if self.num_workers < 0:
            raise UserError("num_workers cannot be negative")
        if self.decode not in ("cpu", "device"):
            raise UserError(f"decode must be 'cpu' or 'device', not {self.decode!r}")
        if self.skip_nonfinite < 0:
            raise UserError(f"skip_nonfinite cannot be negative, not {self.skip_nonfinite}")
        if self.temperature <= 0 or self.knn_temperature <= 0:
            raise UserError("temperatures must be positive")
        if not 0.0 <= self.key_momentum <= 1.0:
            raise UserError(f"key_momentum must lie in [0, 1], not {self.key_momentum}")
        if self.lr <= 0:
            raise UserError(f"lr must be positive, not {self.lr}")
        if self.dsc_assign not in ("kmeans", "prototypes"):
            raise UserError(f"dsc_assign must be 'kmeans' (DSC-KM) or 'prototypes' (DSC-PM), not {self.dsc_assign!r}")
        if self.dsc_clusters < 2:
            raise UserError(f"dsc_clusters must be at least 2, not {self.dsc_clusters}")
        if self.dsc_sinkhorn_eps <= 0:
            raise UserError(f"dsc_sinkhorn_eps must be positive, not {self.dsc_sinkhorn_eps}")
        dsc_weights = (self.dsc_weight_instance, self.dsc_weight_pixel, self.dsc_weight_category)
        if min(dsc_weights) < 0 or sum(dsc_weights) == 0:
            raise UserError(f"DSC's loss weights (instance, pixel, category) must be >= 0 and not all 0, not {dsc_weights}")
        if self.k < -1:
            raise UserError("k must be >= 0, or -1 for every same-class image")
        if self.k == -1 and self.method == "scan":
            raise UserError("k = -1 (all same-class images) is the supervised contrastive limit: use --method supcon")
        import timm

        if not timm.is_model(self.model):
            raise UserError(f"unknown backbone {self.model!r}: not a timm architecture (see timm.list_models())")
        if self.method == "scan" and self.batch_size < self.k + 1:
            raise UserError(f"batch_size {self.batch_size} cannot hold one anchor and its K={self.k} neighbours")
        return self

    @property
    def group_size(self) -> int:
        """Images per anchor in a batch: the anchor and its K neighbours (1 for every other method)."""
        return self.k + 1 if self.method == "scan" else 1

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _field_type(f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(TrainConfig)
    tp = hints[f.name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _coerce(name: str, value: Any, tp: type) -> Any:
    if value is None:
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{name} expects true or false, not {value!r}")
    try:
        return tp(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} expects a {tp.__name__}, not {value!r}") from None


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    # recipe files may annotate values as {value: X, source: paper|inherited|...}
    data = {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in data.items()}
    data.pop("_meta", None)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"config file {path} has unknown option(s): {', '.join(unknown)}")
    return data


def build_config(*layers: dict) -> TrainConfig:
    """Defaults, then each layer (YAML dicts, command-line dicts) in order; later layers win."""
    merged: dict = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items()})
    types = {f.name: _field_type(f) for f in fields(TrainConfig)}
    kwargs = {k: _coerce(k, v, types[k]) for k, v in merged.items()}
    return TrainConfig(**kwargs).validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --option per config field; only options actually given end up in the namespace."""
    parser.add_argument("--config", help="YAML recipe; command-line options override its values")
    comments = _field_comments()
    for f in fields(TrainConfig):
        tp = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        helptext = comments.get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else None
        helptext = f"{helptext} (default: {default})"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, type=_bool_arg, nargs="?", const=True,
                                default=argparse.SUPPRESS, metavar="BOOL", help=helptext)
        else:
            parser.add_argument(flag, dest=f.name, type=str, default=argparse.SUPPRESS,
                                metavar=tp.__name__.upper(), help=helptext)


def _bool_arg(s: str) -> bool:
    return _coerce("flag", s, bool)


def _field_comments() -> dict:
    import inspect

    out = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith("#"):
            name = line.split(":", 1)[0].strip()
            out[name] = line.split("#", 1)[1].strip()
    return out


def config_from_args(ns: argparse.Namespace, base: Optional[dict] = None) -> TrainConfig:
    """defaults <- base <- --config file <- explicit command-line options."""
    cli = {k: v for k, v in vars(ns).items() if k != "config"}
    file_layer = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    return build_config(base or {}, file_layer, cli)
