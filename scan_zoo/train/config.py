"""One config object for training: a dataclass, filled from defaults <- YAML recipe <- command line.

The resolved config is written into every run directory and every checkpoint, so a run can be
rebuilt from its files alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated

import timm
import yaml

from scan_zoo.common.errors import UserError
from scan_zoo.common.recipes import PIPELINE_RECIPES, list_recipes, recipe_path
from scan_zoo.common.validation import (
    FLOAT32_MAX,
    AtLeast,
    Choice,
    Positive,
    Probability,
    Range,
    Text,
    check_fields,
    field_specs,
    parse_fields,
)
from scan_zoo.train.interrupt import parse_duration, parse_signals

RECIPE_FLAGS = ("config", "moco_config", "scan_config")  # options naming recipes, not config fields
METHODS = ("pipeline", "supervised", "moco", "supcon", "scan", "dsc")
DSC_WEIGHT = AtLeast(0, note="DSC's loss weights (instance, pixel, category) must be >= 0 and not all 0")


@dataclass
class TrainConfig:
    """Everything a training run depends on. Field comments are the command-line help."""

    # One field a line, unformatted: its trailing comment is its --help text (read by _field_comments).
    # fmt: off
    # what to train
    method: Annotated[str, Choice(METHODS)] = "pipeline"  # pipeline (MoCo-v2 -> mining -> SCAN), supervised, moco, supcon, scan or dsc
    model: Annotated[str, Text(1)] = "test_resnet"  # any timm architecture, built with num_classes=0
    data: Annotated[str, Text(1)] = "digits"  # an ImageFolder root (with train/ and val/) or 'digits' (the embedded digit scenes)
    data_cache: Annotated[str | None, Text()] = None  # where 'digits' is rendered (default: ~/.cache/scan_zoo/digits)
    output_dir: Annotated[str, Text(1)] = "runs/scan_zoo"  # run directory (the pipeline puts one sub-directory per stage in it)

    # schedule
    epochs: Annotated[int, AtLeast(1)] = 20  # training epochs
    max_steps: Annotated[int | None, AtLeast(1)] = None  # cap on optimiser steps; also shortens the lr schedule
    batch_size: Annotated[int, AtLeast(2)] = 128  # images per process per step (SCAN: anchors x (K + 1))
    lr: Annotated[float, Range(0, FLOAT32_MAX, lo_open=True)] = 0.06  # peak learning rate for the global batch given
    sgd_momentum: Annotated[float, Probability()] = 0.9  # SGD momentum
    weight_decay: Annotated[float, Range(0, 1)] = 1e-4  # SGD weight decay
    warmup_epochs: Annotated[float, AtLeast(0)] = 0.0  # linear warm-up before the cosine decay
    seed: Annotated[int, Range(0, 2 ** 32 - 1)] = 0  # seeds the sampler, augmentation and initialisation

    # contrastive methods
    temperature: Annotated[float, Positive()] = 0.2  # tau in s_ij = q_i . k_j / tau
    queue_size: Annotated[int, AtLeast(1)] = 4096  # L, keys kept in the queue; must be smaller than the training set
    key_momentum: Annotated[float, Probability()] = 0.99  # m in theta_k <- m theta_k + (1 - m) theta_q
    proj_dim: Annotated[int, AtLeast(1)] = 128  # output size of the MLP projection head
    shuffle_bn: bool = True  # MoCo's shuffle-BN for the key encoder (across processes, or split-BN in one)
    key_bn_splits: Annotated[int, AtLeast(1)] = 2  # one process: sub-batches the shuffled key batch is encoded in

    # SCAN
    k: Annotated[int, AtLeast(-1)] = 2  # K, positive neighbours per image; -1 = every same-class image (SupCon limit)
    neighbors: Annotated[str | None, Text()] = None  # neighbour table from `scan-zoo mine` (stage 1)
    appearance_model: Annotated[str | None, Text()] = None  # label-free model to mine neighbours with, if no table is given
    init_from: Annotated[str | None, Text()] = None  # label-free weights to initialise from (default: appearance_model)
    denominator: Annotated[str, Choice(("all", "negatives"))] = "all"  # 'all' (degenerates to MoCo/SupCon) or 'negatives' (Eq. 6 read literally)
    in_batch_negatives: bool = True  # other pseudo-classes in the batch are negatives (Eq. 6)

    # DSC (Dense Semantic Contrast, label-free; the abstract gives no value: each default says why it is this one)
    dsc_feature_layer: Annotated[int | None, Range()] = None  # dense terms' map: index into the backbone's feature_info (-1 = last, DSC's); default: the deepest map >= 4x4 at image_size (ResNet-50 at 224: the last; test_resnet at 32 px: layer2, its last is 1x1)
    dsc_dense_dim: Annotated[int, AtLeast(1)] = 128  # output channels of the dense 1x1-conv head (DenseCL's 128, as the global head)
    dsc_queue_size: Annotated[int | None, AtLeast(1)] = None  # dense-queue length (one entry per image: its mean dense key); default queue_size, as in DenseCL
    dsc_topk: Annotated[int, AtLeast(1)] = 1  # positives per query pixel: the k key pixels of most similar backbone feature (1 = DenseCL's argmax)
    dsc_assign: Annotated[str, Choice(("kmeans", "prototypes"))] = "kmeans"  # pixel categories: 'kmeans' (DSC-KM; default, no extra parameters) or 'prototypes' (DSC-PM, Sinkhorn)
    dsc_clusters: Annotated[int, AtLeast(2)] = 16  # pixel categories per step; far fewer than a batch's images, so categories span images (digits: 10 + ground)
    dsc_kmeans_iters: Annotated[int, AtLeast(1)] = 10  # DSC-KM Lloyd iterations, fixed (no convergence test: same result on every process and resume)
    dsc_sinkhorn_iters: Annotated[int, AtLeast(1)] = 3  # DSC-PM Sinkhorn-Knopp iterations (SwAV's 3)
    dsc_sinkhorn_eps: Annotated[float, Positive()] = 0.05  # DSC-PM entropy regularisation of the balanced assignment (SwAV's 0.05)
    dsc_pixel_samples: Annotated[int, AtLeast(1)] = 512  # query pixels per process in the category loss; bounds its S x (S x processes) logits
    dsc_weight_instance: Annotated[float, DSC_WEIGHT] = 1.0  # weight of the instance (MoCo-v2) term; 1 so DSC with both dense weights 0 is MoCo
    dsc_weight_pixel: Annotated[float, DSC_WEIGHT] = 1.0  # weight of the pixel term; DenseCL weighs its dense term equal to its global one
    dsc_weight_category: Annotated[float, DSC_WEIGHT] = 1.0  # weight of the pixel-category term; no published value, so equal to the others

    # images and augmentation (MoCo-v2, sizes scaled to image_size)
    image_size: Annotated[int, AtLeast(2)] = 32  # training crop size
    eval_resize: Annotated[int | None, AtLeast(1)] = None  # resize before the centre crop for evaluation (default: image_size / 0.875)
    crop_scale_min: Annotated[float, Range(0, 1, lo_open=True)] = 0.2  # RandomResizedCrop lower scale
    blur_prob: Annotated[float, Probability()] = 0.5  # probability of Gaussian blur
    jitter_hue: Annotated[float, Range(0, 0.5)] = 0.1  # ColorJitter hue (MoCo-v2: 0.1; 0.5 turns hue fully random)
    grayscale_prob: Annotated[float, Probability()] = 0.2  # probability of RandomGrayscale
    hflip: bool = True  # random horizontal flip

    # machinery
    strict_data: bool = False  # decode every training image first and stop at the first unreadable one
    skip_nonfinite: Annotated[int, AtLeast(0)] = 0  # steps with a NaN/inf loss to skip (each logged, no optimiser step) before stopping
    num_workers: Annotated[int, AtLeast(0)] = 2  # DataLoader workers per process
    decode: Annotated[str, Choice(("cpu", "device"))] = "cpu"  # where training images are decoded and augmented: 'cpu' (PIL in the loader workers) or 'device' (torchvision.io + batched tensor ops on the training device; non-JPEG files are decoded by the workers)
    log_every_steps: Annotated[int, AtLeast(1)] = 10  # log metrics every this many steps
    save_every_epochs: Annotated[int, AtLeast(1)] = 1  # checkpoint every this many epochs (and at the end)
    save_every_steps: Annotated[int | None, AtLeast(1)] = None  # also checkpoint every this many steps
    keep_checkpoints: Annotated[int, AtLeast(1)] = 2  # complete checkpoints kept; older ones are pruned after a new one is complete
    stop_after_steps: Annotated[int | None, AtLeast(1)] = None  # checkpoint and exit after this many steps (preemption); schedule unchanged
    preempt_signals: Annotated[str, Text(1)] = "TERM,USR1"  # signals that preempt the run: every process finishes its step, a checkpoint is saved, exit status 75 ('none': they end it at once)
    time_limit: Annotated[str | None, Text(1)] = None  # SECONDS or HH:MM:SS after the process started: checkpoint and exit 75 before it runs out (SLURM_JOB_END_TIME, when set and earlier, counts instead)
    time_limit_margin: Annotated[float | None, AtLeast(0)] = None  # stop when fewer seconds than this are left before the time limit; unset: 2 x the longest step + the longest checkpoint write
    resume: Annotated[str | None, Text()] = None  # 'latest' or a checkpoint directory
    dist_timeout: Annotated[float | None, Positive()] = None  # seconds a collective waits for the other processes before the run stops with exit status 4 (default: torch's 30 minutes)
    deterministic: bool = False  # torch deterministic algorithms (bit-exact resume on CPU is exact either way)
    knn_k: Annotated[int, AtLeast(1)] = 20  # kNN evaluation: neighbours
    knn_temperature: Annotated[float, Positive()] = 0.07  # kNN evaluation: vote weight exp(sim / T)
    resume_override: Annotated[str | None, Text()] = None  # with --resume: comma-separated fields (or 'data') allowed to differ from the checkpoint's run, e.g. lr,epochs
    # fmt: on

    def validate(self) -> "TrainConfig":
        """Every field's type and range (declared in its annotation), then the checks that span fields."""
        check_fields(self)
        parse_signals(self.preempt_signals)
        if self.time_limit is not None:
            parse_duration(self.time_limit)
        dsc_weights = (self.dsc_weight_instance, self.dsc_weight_pixel, self.dsc_weight_category)
        if sum(dsc_weights) == 0:
            raise UserError(
                f"DSC's loss weights (instance, pixel, category) must be >= 0 and not all 0, not {dsc_weights}"
            )
        if self.k == -1 and self.method == "scan":
            raise UserError("k = -1 (all same-class images) is the supervised contrastive limit: use --method supcon")
        if self.eval_resize is not None and self.eval_resize < self.image_size:
            raise UserError(
                f"eval_resize {self.eval_resize} is smaller than image_size {self.image_size}: "
                "the centre crop would be padded"
            )
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
    unknown = sorted(set(merged) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise UserError(f"unknown option(s): {', '.join(unknown)}")
    return TrainConfig(**parse_fields(TrainConfig, merged)).validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --option per config field; only options actually given end up in the namespace.

    Each field's help names the default the default run uses: the pipeline (the default method) takes its
    values from the recipes chosen by the data, so a field those recipes set shows their values."""
    parser.add_argument(
        "--config",
        help="YAML recipe: a shipped recipe's name ("
        + ", ".join(list_recipes())
        + ") or a file; command-line options override its values. For the pipeline it is applied "
        "over each stage's recipe",
    )
    for flag, stage in (("--moco-config", "1 (MoCo-v2)"), ("--scan-config", "3 (SCAN)")):
        parser.add_argument(
            flag,
            default=argparse.SUPPRESS,
            metavar="RECIPE",
            help=f"pipeline only: the recipe of stage {stage}, a name or a file (default: chosen by "
            f"the data: {_stage_recipes(flag[2:6])})",
        )
    comments, specs = _field_comments(), field_specs(TrainConfig)
    digits = {stage: load_yaml(recipe_path(name)) for stage, name in PIPELINE_RECIPES["digits"].items()}
    for f in fields(TrainConfig):
        tp = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        helptext = comments.get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if "default:" in helptext:  # the comment says the default in words (e.g. a path chosen at run time)
            helptext = f"{helptext} (allowed: {specs[f.name].allowed()})"
        else:
            helptext = (
                f"{helptext} (default: {_default_text(f.name, default, digits)}; allowed: {specs[f.name].allowed()})"
            )
        if tp is bool:
            parser.add_argument(
                flag,
                dest=f.name,
                type=str,
                nargs="?",
                const=True,
                default=argparse.SUPPRESS,
                metavar="BOOL",
                help=helptext,
            )
        else:
            parser.add_argument(
                flag, dest=f.name, type=str, default=argparse.SUPPRESS, metavar=tp.__name__.upper(), help=helptext
            )


def _stage_recipes(stage: str) -> str:
    return (
        f"{PIPELINE_RECIPES['digits'][stage]} on the digit scenes, "
        f"{PIPELINE_RECIPES['folder'][stage]} on an ImageFolder"
    )


def _default_text(name: str, default, digits: dict) -> str:
    """The default of one field as the default run sees it: the digits recipes' values where they set it."""
    if name in ("method", "data"):
        return str(default)
    set_by = {stage: layer[name] for stage, layer in digits.items() if name in layer}
    if all(v == default for v in set_by.values()):
        return str(default)
    per_stage = ", ".join(f"{PIPELINE_RECIPES['digits'][stage]}: {v}" for stage, v in set_by.items())
    return f"from the recipe ({per_stage}); {default} for --method other than pipeline without --config"


def _field_comments() -> dict:
    out = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith("#"):
            name = line.split(":", 1)[0].strip()
            out[name] = line.split("#", 1)[1].strip()
    return out


def config_from_args(ns: argparse.Namespace, base: dict | None = None) -> TrainConfig:
    """defaults <- base <- --config file <- explicit command-line options."""
    cli = {k: v for k, v in vars(ns).items() if k not in RECIPE_FLAGS}
    file_layer = load_yaml(recipe_path(ns.config)) if getattr(ns, "config", None) else {}
    cfg = build_config(base or {}, file_layer, cli)
    if cfg.method != "pipeline" and any(hasattr(ns, k) for k in ("moco_config", "scan_config")):
        raise UserError(
            f"--moco-config and --scan-config name the pipeline's stage recipes: not used with --method {cfg.method}"
        )
    return cfg


def read_saved_config(path: str | Path) -> TrainConfig:
    """The ``config.yaml`` a run wrote (run directory, checkpoint): checked as strictly as the user's options,
    so an edited or foreign file is one clear error before a resume or an export uses it."""
    path = Path(path)
    values = load_yaml(path)
    return TrainConfig(**parse_fields(TrainConfig, values, what=str(path))).validate()
