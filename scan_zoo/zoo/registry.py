"""The zoo: every weight scan_zoo publishes or documents, declared once in :data:`ENTRIES`.

Everything else is derived from this list: the tags ``import scan_zoo`` adds to timm
(:mod:`scan_zoo.zoo.timm_bridge`), ``hubconf.py``, ``scan-zoo list``, the README's zoo table and the model
cards (:mod:`scan_zoo.zoo.cards`), and the tests parametrised over :func:`list_models`.

An entry states what never changes (architecture, tag, method, recipe, data, preprocessing, licence,
paper). What only exists once weights are made - their sha256, the Hub revision they were published at,
the metrics measured on them - is never typed in: ``scan-zoo publish`` and ``scan-zoo build-digits``
record it in the lock file ``zoo_lock.json`` beside this module (``SCAN_ZOO_LOCK`` names another), and
metrics come from the evaluation code's ``eval_results.json``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from scan_zoo.common.errors import UserError
from scan_zoo.common.paths import PACKAGE_DIR
from scan_zoo.common.readers import read_json_object
from scan_zoo.data.datasets import IMAGENET_MEAN, IMAGENET_STD

WEIGHTS_DIR = PACKAGE_DIR / "weights"  # shipped weights: WEIGHTS_DIR/<arch>.<tag>/model.safetensors
LOCK_NAME = "zoo_lock.json"
HUB_ORG = "scan-zoo"  # where `scan-zoo publish` puts the zoo's weights unless told otherwise


def lock_path() -> Path:
    return Path(os.environ.get("SCAN_ZOO_LOCK") or PACKAGE_DIR / LOCK_NAME)


@dataclass(frozen=True)
class Preprocess:
    """The evaluation transform the weights expect, stated explicitly (never inherited from timm's default tag)."""

    image_size: int
    crop_pct: float
    interpolation: str = "bilinear"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    crop_mode: str = "center"

    def timm_fields(self) -> dict:
        return {
            "input_size": (3, self.image_size, self.image_size),
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
            "interpolation": self.interpolation,
            "mean": tuple(self.mean),
            "std": tuple(self.std),
        }


IMAGENET_224 = Preprocess(224, 0.875)  # resize 256, centre crop 224 (MoCo's evaluation transform)
DIGITS_32 = Preprocess(32, 32 / 37)  # resize 37, centre crop 32: the transform of every number measured on them
#   (eval_linear.py validates at crop = input size, resize = crop / 0.875 rounded; timm resizes to floor(32 / crop_pct))

PAPERS = {
    "scan": (
        "Wei et al., Can Semantic Labels Assist Self-Supervised Visual Representation Learning? (2020)",
        "arXiv:2011.08621",
        "@article{wei2020scan,\n  title={Can Semantic Labels Assist Self-Supervised Visual Representation "
        "Learning?},\n  author={Wei, Longhui and Xie, Lingxi and He, Jianzhong and Chang, Jianlong and "
        "Zhang, Xiaopeng and Zhou, Wengang and Li, Houqiang and Tian, Qi},\n  journal={arXiv preprint "
        "arXiv:2011.08621},\n  year={2020}\n}",
    ),
    "moco": (
        "Chen et al., Improved Baselines with Momentum Contrastive Learning (2020)",
        "arXiv:2003.04297",
        "@article{chen2020mocov2,\n  title={Improved Baselines with Momentum Contrastive Learning},\n  "
        "author={Chen, Xinlei and Fan, Haoqi and Girshick, Ross and He, Kaiming},\n  journal={arXiv preprint "
        "arXiv:2003.04297},\n  year={2020}\n}",
    ),
    "supcon": (
        "Khosla et al., Supervised Contrastive Learning (NeurIPS 2020)",
        "arXiv:2004.11362",
        "@inproceedings{khosla2020supcon,\n  title={Supervised Contrastive Learning},\n  author={Khosla, "
        "Prannay and others},\n  booktitle={NeurIPS},\n  year={2020}\n}",
    ),
    "dsc": (
        "Li et al., Dense Semantic Contrast for Self-Supervised Visual Representation Learning (ACM MM 2021)",
        "doi:10.1145/3474085.3475551",
        "@inproceedings{li2021dsc,\n  title={Dense Semantic Contrast for Self-Supervised Visual Representation "
        "Learning},\n  author={Li, Xiaoni and Zhou, Yu and Zhang, Yifei and Zhang, Aoting and Wang, Wei and Jiang, "
        "Ning and Wu, Haiying and Wang, Weiping},\n  booktitle={ACM MM},\n  year={2021}\n}",
    ),
    "supervised": (
        "He et al., Deep Residual Learning for Image Recognition (CVPR 2016)",
        "arXiv:1512.03385",
        "@inproceedings{he2016resnet,\n  title={Deep Residual Learning for Image Recognition},\n  "
        "author={He, Kaiming and Zhang, Xiangyu and Ren, Shaoqing and Sun, Jian},\n  booktitle={CVPR},\n"
        "  year={2016}\n}",
    ),
}

METHOD_NAMES = {
    "scan": "SCAN (Wei et al.)",
    "moco": "MoCo-v2",
    "supcon": "supervised contrastive",
    "supervised": "supervised cross-entropy",
    "dsc": "DSC (Li et al.)",
}

IN1K = "ImageNet-1K train split (1.28 M images; class labels used by scan, supcon and sup)"
DIGITS = "digit scenes (embedded: scikit-learn's handwritten digits rendered at 32 px; 5,752 train images)"


@dataclass(frozen=True)
class ZooEntry:
    """One zoo weight, ``<arch>.<tag>``.

    Args:
        arch: timm architecture. tag: timm pretrained tag. method: training method (train.py --method).
        recipe: a shipped recipe's name (``scan_zoo/recipes/<recipe>.yaml``, ``--config <recipe>``);
            ``overrides`` are command-line options applied over it (e.g. another ``model``).
        data: what it is (or would be) trained on. preprocess: its evaluation transform.
        shipped: the weights are inside the package (``WEIGHTS_DIR/<name>``), usable offline.
        hf_hub_id: the Hub repository the weights are published to (``None``: none planned).
        reported: numbers reported by a paper for this recipe, with their source; never measured here.
    """

    arch: str
    tag: str
    method: str
    recipe: str
    data: str
    preprocess: Preprocess
    shipped: bool = False
    hf_hub_id: str | None = None
    overrides: tuple = ()
    reported: dict = field(default_factory=dict)
    license: str = "apache-2.0"
    notes: str = ""

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"

    @property
    def paper(self) -> tuple:
        return PAPERS[self.method]

    @property
    def recipe_command(self) -> str:
        extra = "".join(f" --{k.replace('_', '-')} {v}" for k, v in self.overrides)
        return f"accelerate launch train.py --config {self.recipe}{extra}"

    # ------------------------------------------------------------------------------ facts from the lock
    @property
    def facts(self) -> dict:
        """What the lock file records for this entry: sha256, hf_hub_id + revision once published, metrics."""
        return read_lock().get(self.name, {})

    @property
    def weights_dir(self) -> Path:
        return WEIGHTS_DIR / self.name

    @property
    def published(self) -> bool:
        f = self.facts
        return bool(f.get("revision") and f.get("sha256") and f.get("hf_hub_id"))

    @property
    def has_weights(self) -> bool:
        return (self.shipped and (self.weights_dir / "model.safetensors").is_file()) or self.published

    @property
    def status(self) -> str:
        if self.shipped and (self.weights_dir / "model.safetensors").is_file():
            return "shipped"
        if self.published:
            return "published"
        return "recipe"

    @property
    def metrics(self) -> dict:
        """Evaluation results (``eval_results.json`` of the shipped weights, or recorded at publishing)."""
        if self.status == "shipped":
            path = self.weights_dir / "eval_results.json"
            return read_json_object(path) if path.is_file() else {}
        return self.facts.get("metrics", {})


def _in1k(
    arch: str, method: str, tag: str, recipe: str, overrides: tuple = (), reported: dict | None = None, notes: str = ""
) -> ZooEntry:
    return ZooEntry(
        arch,
        tag,
        method,
        recipe,
        IN1K,
        IMAGENET_224,
        hf_hub_id=f"{HUB_ORG}/{arch}.{tag}",
        overrides=overrides,
        reported=reported or {},
        notes=notes,
    )


def _digits(method: str, tag: str) -> ZooEntry:
    return ZooEntry(
        "test_resnet",
        tag,
        method,
        f"digits_{method}",
        DIGITS,
        DIGITS_32,
        shipped=True,
        notes="trained by `scan-zoo build-digits` on a 2-core CPU; a demonstration, not a transfer backbone",
    )


_TABLE7 = "Wei et al. 2020, Table 7: linear probe on ImageNet-1K, ResNet-50"
ENTRIES: tuple[ZooEntry, ...] = (
    _in1k(
        "resnet50",
        "scan",
        "scan_in1k",
        "scan_in1k",
        reported={"linear_top1": 75.0, "linear_top5": 91.6, "source": _TABLE7 + " (SCAN, 400 epochs from MoCo-v2 800)"},
    ),
    _in1k(
        "resnet50",
        "moco",
        "moco_in1k",
        "moco_v2_in1k",
        reported={"linear_top1": 71.1, "source": _TABLE7 + " (MoCo-v2, 800 epochs)"},
    ),
    _in1k("resnet50", "supcon", "supcon_in1k", "supcon_in1k"),
    _in1k("resnet50", "supervised", "sup_in1k", "sup_in1k"),
    _in1k(
        "resnet50",
        "dsc",
        "dsc_in1k",
        "dsc_in1k",
        notes="DSC's full paper is not in hand: its dsc_* values are our readings of the abstract (README 'DSC')",
    ),
    _in1k("resnet18", "scan", "scan_in1k", "scan_in1k", overrides=(("model", "resnet18"),)),
    _in1k("resnet101", "scan", "scan_in1k", "scan_in1k", overrides=(("model", "resnet101"),)),
    _in1k("wide_resnet50_2", "scan", "scan_in1k", "scan_in1k", overrides=(("model", "wide_resnet50_2"),)),
    _in1k(
        "vit_small_patch16_224",
        "scan",
        "scan_in1k",
        "scan_in1k",
        overrides=(("model", "vit_small_patch16_224"),),
        notes="the paper trains ResNets only; this applies the ResNet-50 recipe (SGD) unchanged to ViT-S/16",
    ),
    _digits("scan", "scan_digits"),
    _digits("moco", "moco_digits"),
    _digits("supcon", "supcon_digits"),
    _digits("supervised", "sup_digits"),
    _digits("dsc", "dsc_digits"),
)


# ------------------------------------------------------------------------------------------- look-ups
def list_models(pattern: str = "*", with_weights: bool = False) -> list[str]:
    """Zoo names matching ``pattern`` (fnmatch), in declaration order."""
    return [e.name for e in ENTRIES if fnmatch.fnmatch(e.name, pattern) and (e.has_weights or not with_weights)]


def get_entry(name: str) -> ZooEntry:
    for e in ENTRIES:
        if e.name == name:
            return e
    raise UserError(f"{name!r} is not in the zoo; scan-zoo list shows every entry")


def find_entry(arch: str | None, tag: str | None) -> ZooEntry | None:
    for e in ENTRIES:
        if e.arch == arch and e.tag == tag:
            return e
    return None


# ------------------------------------------------------------------------------------ checked facts
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")


def check_revision(value, where: str) -> str:
    """A Hub commit id: exactly 40 lowercase hex digits. Branch and tag names move, so they pin nothing, and a
    server-chosen string must never become part of a cache path (``refs/<revision>``)."""
    if not (isinstance(value, str) and _COMMIT.fullmatch(value)):
        raise UserError(
            f"{where}: revision {value!r} is not a commit id (40 lowercase hex digits); branch names, "
            "tags and short ids do not pin weights"
        )
    return value


def check_sha256(value, where: str) -> str:
    """A sha256 hex digest: exactly 64 lowercase hex digits."""
    if not (isinstance(value, str) and _SHA256.fullmatch(value)):
        raise UserError(f"{where}: sha256 {value!r} is not a sha256 digest (64 lowercase hex digits)")
    return value


def check_repo_id(value, where: str = "") -> str:
    """``ORG/NAME`` with Hub-safe characters only: no '..', '--', absolute paths, URL schemes or extra slashes."""
    parts = value.split("/") if isinstance(value, str) else []
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) for p in parts) or ".." in value or "--" in value:
        what = f"{where}: hf_hub_id {value!r}" if where else repr(value)
        raise UserError(
            f"{what} is not a Hub repository id (expected ORG/NAME: letters, digits, '-', '_', '.'; "
            "no '..', slashes, schemes or absolute paths)"
        )
    return value


_CHECKS = {"revision": check_revision, "sha256": check_sha256, "hf_hub_id": check_repo_id}


def check_facts(name: str, facts, where: str) -> dict:
    """A lock entry: a JSON object whose revision, sha256 and hf_hub_id (where present) are well formed."""
    if not isinstance(facts, dict):
        raise UserError(f"{where}: entry {name!r} is not a JSON object")
    for key, check in _CHECKS.items():
        if key in facts:
            check(facts[key], f"{where}, entry {name!r}")
    return facts


# ------------------------------------------------------------------------------------------- the lock
_LOCK_CACHE: dict = {}  # path -> ((mtime_ns, size), parsed lock): entries read the lock many times each


def _parse_lock(path: Path) -> dict:
    lock = read_json_object(path)
    for name, facts in lock.items():
        check_facts(name, facts, f"the zoo's lock file {path}")
    return lock


def read_lock(path: Path | None = None) -> dict:
    """The lock file's entries, every revision, sha256 and repository id checked (a bad one: UserError)."""
    path = Path(path) if path else lock_path()
    if not path.is_file():
        return {}
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _LOCK_CACHE.get(str(path))
    if cached is None or cached[0] != stamp:
        cached = (stamp, _parse_lock(path))
        _LOCK_CACHE[str(path)] = cached
    return json.loads(json.dumps(cached[1]))  # a copy: callers may modify what they get


def record(name: str, facts: dict, path: Path | None = None) -> Path:
    """Merge ``facts`` (sha256, hf_hub_id, revision, metrics, ...) into the lock entry of ``name``.

    The merged entry is checked before anything is written: a malformed revision, sha256 or repository id
    leaves the lock file as it was."""
    path = Path(path) if path else lock_path()
    lock = read_lock(path)
    lock[name] = check_facts(name, {**lock.get(name, {}), **facts}, f"refusing to record in {path}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(lock.items())), indent=2) + "\n")
    os.replace(tmp, path)
    _LOCK_CACHE.pop(str(path), None)
    return path
