"""Linear probing of a frozen backbone: MoCo's protocol, its fast cached variant, and kNN beside both.

The protocols (docs/METHOD.md, "Evaluation protocols"):

- ``moco``: "Linear probe, MoCo protocol: frozen backbone in eval mode, linear layer on pooled features,
  SGD lr 30, momentum 0.9, wd 0, 100 epochs, lr x0.1 at 60 and 80, batch 256, RandomResizedCrop + flip
  for training, resize 256 / centre crop 224 for validation; top-1 and top-5." (MoCo's main_lincls.py)
- ``cached``: "Fast linear probe: features extracted once and cached, the classifier trained on the
  cache." The same linear layer, optimiser and schedule, on centre-crop features of the train split.
- kNN, reported with both: "cosine on L2-normalised features, k = 20, votes weighted by exp(sim / 0.07)"
  (:func:`scan_zoo.core.metrics.knn_classify`, train split as the memory bank).

Choices METHOD.md leaves open, made here:

- Sizes scale with the images: crop = the model's input size, resize = crop / 0.875 (256 / 224), on
  the digit scenes too (crop 32, resize 37). The ratio is what keeps the two protocols comparable:
  RandomResizedCrop shows objects larger than the full image does, and validating on a centre crop of
  an enlarged image shows them closer to their training size (FixRes, Touvron et al. 2019; on the
  digits the crops enlarge by 1.17 on average, the validation by 37 / 32 = 1.16). Validating
  the digits on the whole 32-px image instead (resize 32, used until 2026-11-25) put the moco
  protocol 1.95 points below the cached one on the MoCo backbone then shipped (1.60 on the rebuilt
  one); the same classifier scored 93.5 on resize-37 centre crops (benchmarks/RESULTS.md). The crop cuts 2.2 px off each side of a scene,
  where part of the glyph sometimes is: the protocol's cost, as on ImageNet. No flip on the digits
  by default (digits are not mirror-symmetric).
  RandomResizedCrop keeps torchvision's (and main_lincls.py's) scale (0.08, 1) unless told otherwise,
  except on the digit scenes, where it is (0.5, 1): at 32 px a crop of 8 % of the image is a fragment
  of one stroke, and probing on such crops measured 6 points below the cached probe on the same
  backbone (benchmarks/RESULTS.md). 0.5 is also the lower scale the digits training recipes use.
- The linear layer is main_lincls.py's: ``fc.weight ~ N(0, 0.01)``, ``fc.bias = 0``, on the raw pooled
  features (no normalisation, no BatchNorm in front: MoCo v1/v2; MoCo v3 and MAE add a BN, not done here).
  ``cached`` uses the same layer on the same raw features.
- The frozen backbone runs under ``no_grad`` in eval mode: BN uses (and keeps) its running statistics.
  Gradients never reached it in main_lincls.py either, so the computation is the same.
- Validation features are computed once: the backbone is frozen and the centre crop deterministic, so
  validating each epoch is one matmul, identical to running the backbone again.
- The numbers reported are the LAST epoch's; every epoch's are kept in ``history``
  (main_lincls.py prints the best epoch's, which selects on the validation set).
- Step schedule per epoch: ``lr = lr0 * 0.1 ** #{milestones <= epoch}`` (epochs counted from 0, as
  main_lincls.py's adjust_learning_rate); data reshuffled each epoch, last partial batch kept.
- Several processes: feature extraction is sharded by :func:`~scan_zoo.models.features.extract_features`;
  the linear layer is then trained in every process alike (same seeds, same data, no collective), so
  nothing can deadlock and every process ends with the same classifier. For ``moco`` this repeats the
  training in each process (no DDP): simple and correct, not faster.
- At the end every backbone weight and buffer is compared, bit for bit, with a copy taken before
  (main_lincls.py's sanity_check); a difference raises :class:`BackboneChanged`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from scan_zoo.common import distributed as dist_lib
from scan_zoo.common.errors import UserError
from scan_zoo.common.validation import (
    AtLeast,
    Choice,
    Positive,
    Probability,
    Range,
    Text,
    check_fields,
)
from scan_zoo.core import metrics as evaluation
from scan_zoo.data import datasets as data_lib
from scan_zoo.models import features as features_lib

logger = logging.getLogger(__name__)

PROTOCOLS = ("cached", "moco")
RESULTS_NAME = "eval_results.json"
CACHE_FORMAT = 2  # bump when what a cache file holds changes
DIGITS_SIZE = 32  # the digit scenes' side in pixels
IMAGENET_CROP_SCALE_MIN = 0.08  # main_lincls.py's RandomResizedCrop (torchvision's default scale)
DIGITS_CROP_SCALE_MIN = 0.5  # 32-px digit scenes: smaller crops are stroke fragments (module docstring)
LR_DECAY = 0.1  # main_lincls.py: lr x 0.1 at each milestone
CROP_SCALE = Range(0, 1, lo_open=True, note="crop scale must satisfy 0 < min <= max <= 1")


class BackboneChanged(RuntimeError):
    """Linear probing modified the frozen backbone: a bug, never the user's input."""


@dataclass
class ProbeConfig:
    """One linear-probe evaluation. Defaults are MoCo's main_lincls.py; None means "from the model / data"."""

    protocol: Annotated[str, Choice(PROTOCOLS)] = "cached"  # cached (classifier on centre-crop features extracted once) or moco (augmented crops)
    epochs: Annotated[int, AtLeast(1)] = 100  # training epochs of the linear layer
    lr: Annotated[float, Range(0, 1e4, lo_open=True)] = 30.0  # initial learning rate (batch 256)
    momentum: Annotated[float, Probability()] = 0.9  # SGD momentum
    weight_decay: Annotated[float, Range(0, 1)] = 0.0  # SGD weight decay
    batch_size: Annotated[int, AtLeast(1)] = 256  # images (or cached features) per step
    milestones: Annotated[tuple[int, ...], AtLeast(0)] = (60, 80)  # epochs at which lr is multiplied by 0.1
    image_size: Annotated[Optional[int], AtLeast(1)] = None  # crop size (default: the model's input size; 32 on the digits)
    eval_resize: Annotated[Optional[int], AtLeast(1)] = None  # resize before the centre crop (default: image_size / 0.875)
    crop_scale_min: Annotated[Optional[float], CROP_SCALE] = None  # RandomResizedCrop lower scale, moco protocol (default: 0.08, MoCo's; 0.5 on the digits)
    crop_scale_max: Annotated[float, CROP_SCALE] = 1.0
    hflip: Optional[bool] = None  # random horizontal flip (moco protocol; default: on, off on the digits)
    mean: Annotated[Optional[tuple[float, ...]], Range()] = None  # normalisation (default: the model's)
    std: Annotated[Optional[tuple[float, ...]], Positive()] = None
    knn_k: Annotated[int, AtLeast(1)] = 20  # kNN: neighbours
    knn_temperature: Annotated[float, Positive()] = 0.07  # kNN: vote weight exp(sim / T)
    seed: Annotated[int, Range(-2 ** 63, 2 ** 63 - 1)] = 0  # classifier initialisation, data order, augmentation
    num_workers: Annotated[int, AtLeast(0)] = 2  # DataLoader workers
    extract_batch_size: Annotated[int, AtLeast(1)] = 256  # batch size of feature extraction
    cache_dir: Annotated[Optional[str], Text()] = None  # feature cache (default: $SCAN_ZOO_CACHE or ~/.cache/scan_zoo, /features)
    progress: bool = True  # tqdm progress bars

    def validate(self) -> "ProbeConfig":
        """Every field's type and range (declared in its annotation), then the checks that span fields."""
        check_fields(self, "the evaluation options")
        if self.crop_scale_min is not None and self.crop_scale_min > self.crop_scale_max:
            raise UserError(f"crop scale must satisfy min <= max, not ({self.crop_scale_min}, {self.crop_scale_max})")
        if None not in (self.image_size, self.eval_resize) and self.eval_resize < self.image_size:
            raise UserError(f"eval_resize {self.eval_resize} is smaller than image_size {self.image_size}: "
                            "the centre crop would be padded")
        return self


# --------------------------------------------------------------------------------------- preprocessing
def model_preprocessing(model: nn.Module, weights: Optional[Path]) -> dict:
    """The model's own input size and normalisation: ``{"image_size", "mean", "std"}``.

    Read from timm's config.json beside the weights, else from a scan_zoo training checkpoint's
    config.yaml (trained on ImageNet statistics), else (bare or converted weights: MoCo's ImageNet
    statistics) the architecture's timm default size; a timm name brings its pretrained_cfg.
    """
    from scan_zoo.common.readers import read_yaml_mapping
    from scan_zoo.models.loading import read_config

    default = model.pretrained_cfg
    if weights is None:
        return {"image_size": int(default["input_size"][-1]), "mean": tuple(default["mean"]),
                "std": tuple(default["std"])}
    cfg = read_config(weights).get("pretrained_cfg")
    if cfg:
        try:
            out = {"image_size": int(cfg["input_size"][-1]), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
            if not all(isinstance(v, (int, float)) for v in out["mean"] + out["std"]):
                raise TypeError("mean and std must hold numbers")
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UserError(f"{weights.parent / 'config.json'}: pretrained_cfg needs input_size, mean and std "
                            f"lists of numbers ({type(e).__name__}: {e})") from None
        return out
    size = int(default["input_size"][-1])
    ckpt = weights.parent / "config.yaml"
    if ckpt.is_file():
        value = read_yaml_mapping(ckpt).get("image_size") or size
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{ckpt}: image_size must be an integer, not {value!r}")
        size = value
    return {"image_size": size, "mean": data_lib.IMAGENET_MEAN, "std": data_lib.IMAGENET_STD}


def resolve_config(cfg: ProbeConfig, preprocessing: dict, data: str) -> ProbeConfig:
    """Fill the settings left to the model and the data (see the module docstring); validates."""
    digits = data == "digits"
    size = cfg.image_size or (DIGITS_SIZE if digits else preprocessing["image_size"])
    resize = cfg.eval_resize or int(round(size / 0.875))
    scale_min = cfg.crop_scale_min or (DIGITS_CROP_SCALE_MIN if digits else IMAGENET_CROP_SCALE_MIN)
    return dataclasses.replace(
        cfg, image_size=size, eval_resize=resize, crop_scale_min=scale_min,
        hflip=(not digits) if cfg.hflip is None else cfg.hflip,
        mean=tuple(cfg.mean or preprocessing["mean"]), std=tuple(cfg.std or preprocessing["std"]),
        milestones=tuple(int(m) for m in cfg.milestones)).validate()


def eval_transform(cfg: ProbeConfig):
    """Resize then centre crop (validation of both protocols; training of ``cached``)."""
    return data_lib.eval_transform(cfg.image_size, cfg.eval_resize, cfg.mean, cfg.std)


def train_transform(cfg: ProbeConfig):
    """``moco`` training: RandomResizedCrop (+ horizontal flip), as main_lincls.py."""
    from torchvision import transforms as T

    ops = [T.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_scale_min, cfg.crop_scale_max))]
    ops += [T.RandomHorizontalFlip()] if cfg.hflip else []
    return T.Compose(ops + [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])


def protocol_settings(cfg: ProbeConfig) -> dict:
    """What the results record about the protocol (JSON types)."""
    centre = f"Resize({cfg.eval_resize}) + CenterCrop({cfg.image_size})"
    if cfg.protocol == "moco":
        train = (f"RandomResizedCrop({cfg.image_size}, scale=({cfg.crop_scale_min}, {cfg.crop_scale_max}))"
                 + (" + RandomHorizontalFlip" if cfg.hflip else ""))
    else:
        train = centre + " (features extracted once)"
    return {"name": cfg.protocol, "epochs": cfg.epochs, "lr": cfg.lr, "momentum": cfg.momentum,
            "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size, "milestones": list(cfg.milestones),
            "lr_decay": LR_DECAY, "optimizer": "SGD", "train_transform": train, "eval_transform": centre,
            "image_size": cfg.image_size, "eval_resize": cfg.eval_resize,
            "hflip": bool(cfg.hflip) and cfg.protocol == "moco",
            "crop_scale": [cfg.crop_scale_min, cfg.crop_scale_max] if cfg.protocol == "moco" else None,
            "interpolation": "bilinear", "mean": list(cfg.mean), "std": list(cfg.std),
            "classifier": "linear on raw pooled features, weight ~ N(0, 0.01), bias 0",
            "backbone": "frozen, eval mode (BN statistics frozen)", "reported": "last epoch", "seed": cfg.seed}


def load_splits(root: Path):
    """``(train, val)`` ImageFolders of ``root``, which must list the same classes."""
    train, val = data_lib.image_folder(root, "train"), data_lib.image_folder(root, "val")
    if train.classes != val.classes:
        only_val = sorted(set(val.classes) - set(train.classes))
        only_train = sorted(set(train.classes) - set(val.classes))
        raise UserError(f"train and val of {root} have different classes: only in val {only_val[:10]}, "
                        f"only in train {only_train[:10]}")
    return train, val


# ------------------------------------------------------------------------------------ backbone check
def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every weight and buffer."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """main_lincls.py's sanity_check, bit for bit and buffers included: raise :class:`BackboneChanged`
    naming every weight or buffer that differs from ``before`` (NaNs compare by their bits)."""
    after = module.state_dict()
    changed = sorted(set(before) ^ set(after))
    changed += [k for k in before if k in after and (before[k].dtype != after[k].dtype
                                                     or before[k].shape != after[k].shape
                                                     or not torch.equal(_bits(before[k]), _bits(after[k])))]
    if changed:
        raise BackboneChanged(f"linear probing changed the frozen backbone: {changed[:10]}"
                              + (f" and {len(changed) - 10} more" if len(changed) > 10 else ""))


# ------------------------------------------------------------------------------------- feature cache
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
    what = {"format": CACHE_FORMAT, "weights": weights_digest(backbone), "train": files_digest(train),
            "val": files_digest(val), "image_size": cfg.image_size, "eval_resize": cfg.eval_resize,
            "mean": list(cfg.mean), "std": list(cfg.std), "interpolation": "bilinear",
            "features": "pooled, eval mode, float32"}
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


def read_feature_cache(path: Path, what: dict) -> tuple[Optional[dict], Optional[str]]:
    """``(tensors, None)`` if ``path`` holds the features ``what`` describes, byte for byte as written;
    else ``(None, why not)``. The file records ``what`` and the sha256 of its tensors, both compared here:
    a file renamed, copied from another run, edited or damaged is never taken for the features it claims."""
    from safetensors import safe_open

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
    from safetensors.torch import save_file

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
            f, y = features_lib.extract_features(backbone, data_lib.EvalImages(ds, tf), cfg.extract_batch_size,
                                               cfg.num_workers, device, desc=f"{split} features", progress=cfg.progress)
            tensors[f"{split}_features"], tensors[f"{split}_labels"] = f.contiguous(), y.contiguous()  # [N, D], [N]
        if dist_lib.rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file(tensors, str(tmp), metadata={"scan_zoo_feature_cache": json.dumps(what),
                                                   "tensors_sha256": tensors_digest(tensors)})
            os.replace(tmp, path)
    return {**tensors, "cache_path": str(path), "cache_hit": hit}


# ---------------------------------------------------------------------------------------- linear layer
def make_classifier(dim: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """main_lincls.py's head: ``fc.weight.normal_(0, 0.01)``, ``fc.bias.zero_()``."""
    fc = nn.Linear(dim, num_classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(num_classes, dim, generator=g) * 0.01)  # [C, D]
        fc.bias.zero_()
    return fc


def lr_at(epoch: int, lr: float, milestones: Iterable[int]) -> float:
    """main_lincls.py's adjust_learning_rate: ``lr * 0.1`` for each milestone ``<= epoch`` (from 0)."""
    return lr * LR_DECAY ** sum(epoch >= m for m in milestones)


def train_epoch(classifier: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable) -> float:
    """One pass of SGD on cross-entropy; ``batches`` yields ``(features [B, D], labels [B])``. Mean loss."""
    classifier.train()
    total, n = 0.0, 0
    for x, y in batches:
        loss = F.cross_entropy(classifier(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, n = total + loss.item() * len(y), n + len(y)
    return total / max(n, 1)


@torch.no_grad()
def classifier_accuracy(classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 / top-5 (percent) of ``classifier`` on ``features [M, D]``."""
    classifier.eval()
    return evaluation.topk_accuracy(classifier(features).float().cpu(), labels.cpu())


def fit_linear(epoch_batches: Callable[[int], Iterable], dim: int, num_classes: int, val_features: torch.Tensor,
               val_labels: torch.Tensor, cfg: ProbeConfig, device="cpu") -> tuple[nn.Linear, list[dict]]:
    """Train the linear layer for ``cfg.epochs`` on ``epoch_batches(epoch)``; validate after every epoch.

    Returns ``(classifier, history)``, ``history[e] = {"epoch", "lr", "loss", "top1", "top5"}``.
    """
    from tqdm.auto import tqdm

    classifier = make_classifier(dim, num_classes, cfg.seed).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    val_features, val_labels = val_features.to(device), val_labels.to(device)
    history = []
    bar = tqdm(range(cfg.epochs), desc=f"linear ({cfg.protocol})", unit="epoch",
               disable=not cfg.progress or dist_lib.rank() != 0)
    for epoch in bar:
        lr = lr_at(epoch, cfg.lr, cfg.milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = train_epoch(classifier, optimizer, epoch_batches(epoch))
        if not math.isfinite(loss):
            logger.warning("linear probe: non-finite training loss at epoch %d (lr %g)", epoch + 1, lr)
        history.append({"epoch": epoch + 1, "lr": lr, "loss": loss,
                        **classifier_accuracy(classifier, val_features, val_labels)})
        bar.set_postfix(loss=f"{loss:.4f}", top1=f"{history[-1]['top1']:.2f}")
    return classifier, history


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed},{epoch},probe".encode(), digest_size=8).digest(), "little") >> 1


def cached_batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, epoch: int,
                   device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An epoch over cached features in a seeded random order: ``(features [B, D], labels [B])``."""
    perm = torch.randperm(len(features), generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))  # [N]
    for lo in range(0, len(perm), batch_size):
        idx = perm[lo:lo + batch_size]  # [B]
        yield features[idx].to(device), labels[idx].to(device)


def augmented_batches(backbone: nn.Module, dataset, cfg: ProbeConfig, epoch: int,
                      device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An epoch of augmented crops through the frozen backbone: ``(features [B, D], labels [B])``.

    Order and crops are functions of ``(seed, epoch)`` (the DataLoader's generator seeds its workers;
    without workers the crops are drawn under a forked, seeded RNG, so the caller's RNG is untouched).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    seed = _epoch_seed(cfg.seed, epoch)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                        generator=torch.Generator().manual_seed(seed), drop_last=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for x, y, _ in tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", leave=False,
                            disable=not cfg.progress or dist_lib.rank() != 0):
            with torch.no_grad():
                feats = backbone(x.to(device)).float()  # [B, D], eval mode: BN running statistics used, not updated
            yield feats, y.to(device)


def training_batches(backbone: nn.Module, train, feats: dict, cfg: ProbeConfig,
                     device="cpu") -> Callable[[int], Iterable]:
    """``epoch -> batches`` of ``cfg.protocol``'s training data: the cached centre-crop features
    (``feats`` from :func:`centre_crop_features`) or augmented crops of ``train`` through the frozen backbone."""
    if cfg.protocol == "cached":
        f_train, y_train = feats["train_features"].to(device), feats["train_labels"].to(device)  # [N, D], [N]
        return lambda epoch: cached_batches(f_train, y_train, cfg.batch_size, cfg.seed, epoch, device)
    augmented = data_lib.EvalImages(train, train_transform(cfg))
    return lambda epoch: augmented_batches(backbone, augmented, cfg, epoch, device)


# ------------------------------------------------------------------------------------------- protocols
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
        _, history = fit_linear(training_batches(backbone, train, feats, cfg, device), dim, num_classes,
                                feats["val_features"], feats["val_labels"], cfg, device)
        knn_scores = evaluation.knn_classify(feats["train_features"], feats["train_labels"], feats["val_features"],
                                             num_classes, cfg.knn_k, cfg.knn_temperature)  # [M, C]
        knn = evaluation.topk_accuracy(knn_scores, feats["val_labels"])
    finally:
        backbone.train(was_training)
        for n, p in backbone.named_parameters():
            p.requires_grad_(requires_grad[n])
    assert_unchanged(backbone, before)
    last = history[-1]
    return {"protocol": protocol_settings(cfg), "top1": last["top1"], "top5": last["top5"],
            "knn": {"top1": knn["top1"], "top5": knn["top5"], "k": cfg.knn_k, "temperature": cfg.knn_temperature},
            "history": history, "feature_cache": {"path": feats["cache_path"], "hit": feats["cache_hit"]},
            "feature_dim": dim, "seconds": time.perf_counter() - start}


def evaluate_model(model: str, data: str, cfg: ProbeConfig, arch: Optional[str] = None,
                   data_cache: Optional[str] = None, device="cpu") -> dict:
    """Load ``model`` (anything :func:`scan_zoo.models.loading.load_backbone` accepts), probe it on ``data``
    (an ImageFolder root with train/ and val/, or ``digits``) and return the results with their provenance."""
    import datetime
    from importlib.metadata import version

    from scan_zoo.common.files import sha256_file
    from scan_zoo.models.backbones import check_input_size
    from scan_zoo.models.loading import load_backbone

    root = data_lib.resolve_data_root(data, data_cache, progress=cfg.progress and dist_lib.rank() == 0)
    train, val = load_splits(root)
    backbone, description = load_backbone(model, arch=arch)
    weights = Path(description) if Path(description).is_file() else None
    cfg = resolve_config(cfg, model_preprocessing(backbone, weights), data)
    check_input_size(backbone, cfg.image_size, description)
    result = linear_probe(backbone.to(device), train, val, cfg, device)
    result.update({"dataset": data, "data_root": str(root), "num_classes": len(train.classes),
                   "train_images": len(train), "val_images": len(val), "model": model,
                   "architecture": backbone.pretrained_cfg.get("architecture"), "weights": description})
    if weights is not None:
        result["weights_sha256"] = sha256_file(weights)
    result.update({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "scan_zoo_version": version("scan-zoo")})
    return result


# --------------------------------------------------------------------------------------------- results
def results_path(model: str, out: Optional[str] = None) -> Path:
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
