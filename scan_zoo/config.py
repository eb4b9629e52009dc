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

METHODS = ("pipeline", "supervised", "moco", "supcon", "scan")


@dataclass
class TrainConfig:
    """Everything a training run depends on. Field comments are the command-line help."""

    # what to train
    method: str = "pipeline"  # pipeline (MoCo-v2 -> mining -> SCAN), supervised, moco, supcon or scan
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
    log_every_steps: int = 10  # log metrics every this many steps
    save_every_epochs: int = 1  # checkpoint every this many epochs (and at the end)
    save_every_steps: Optional[int] = None  # also checkpoint every this many steps
    keep_checkpoints: int = 2  # complete checkpoints kept; older ones are pruned after a new one is complete
    stop_after_steps: Optional[int] = None  # checkpoint and exit after this many steps (preemption); schedule unchanged
    resume: Optional[str] = None  # 'latest' or a checkpoint directory
    deterministic: bool = False  # torch deterministic algorithms (bit-exact resume on CPU is exact either way)
    knn_k: int = 20  # kNN evaluation: neighbours
    knn_temperature: float = 0.07  # kNN evaluation: vote weight exp(sim / T)

    def validate(self) -> "TrainConfig":
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.denominator not in ("all", "negatives"):
            raise UserError(f"denominator must be 'all' or 'negatives', not {self.denominator!r}")
        for name in ("batch_size", "epochs", "queue_size", "proj_dim", "image_size", "log_every_steps",
                     "save_every_epochs", "keep_checkpoints", "key_bn_splits", "knn_k",
                     "max_steps", "save_every_steps", "stop_after_steps"):  # the last three may be unset
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, not {value}")
        if self.num_workers < 0:
            raise UserError("num_workers cannot be negative")
        if self.skip_nonfinite < 0:
            raise UserError(f"skip_nonfinite cannot be negative, not {self.skip_nonfinite}")
        if self.temperature <= 0 or self.knn_temperature <= 0:
            raise UserError("temperatures must be positive")
        if not 0.0 <= self.key_momentum <= 1.0:
            raise UserError(f"key_momentum must lie in [0, 1], not {self.key_momentum}")
        if self.lr <= 0:
            raise UserError(f"lr must be positive, not {self.lr}")
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
