"""The zoo inside timm: ``import scan_zoo`` makes every entry a timm pretrained tag whose weights load verified.

timm has no public API for adding a pretrained tag to an architecture it already knows, nor a hook to
check a file's sha256 before it loads it. Both are done here, each in one small function written against
timm's internals (``timm.models._registry`` and ``timm.models._builder.load_pretrained``); each checks
that what it touches is still there and fails loudly if not, and ``tests/test_zoo.py`` covers both.

After :func:`install`:

- ``timm.create_model('resnet50.scan_in1k', pretrained=True)`` builds a headless ResNet-50 (the zoo's
  weights are backbones: ``num_classes=0``; ``num_classes=N`` adds a fresh classifier under timm's usual
  name) and loads the published weights at their pinned Hub revision after checking their sha256;
- ``timm.create_model('test_resnet.scan_digits', pretrained=True)`` loads weights shipped in the package;
- ``timm.list_pretrained('*scan*')`` lists the entries that have weights; recipe-only entries are
  registered too (``pretrained=False`` works) but asking for their weights is a clear error, never a
  silent random initialisation.

A lock file with a malformed entry does not break ``import scan_zoo``: the tags are registered without
weights, and asking for an entry's weights (or ``scan-zoo list``) reports the lock's problem in one line.
"""

from __future__ import annotations

import functools

from timm.models import _builder
from timm.models import _registry as reg

from scan_zoo.zoo import hub
from scan_zoo.zoo.registry import ENTRIES, find_entry
from scan_zoo.zoo.timm_cfg import has_weights, pretrained_cfg

_MARK = "_scan_zoo_hook"


def register_tags(entries=ENTRIES) -> None:
    """Add each entry to timm's registry as ``<arch>.<tag>`` (timm has no public call for this)."""
    needed = ("_model_pretrained_cfgs", "_model_default_cfgs", "_model_with_tags", "_model_has_pretrained")
    missing = [n for n in needed if not hasattr(reg, n)]
    if missing:
        raise RuntimeError(
            f"timm {__import__('timm').__version__} moved its registry internals ({missing}): "
            "scan_zoo cannot add its tags; update scan_zoo.zoo.timm_bridge.register_tags"
        )
    for entry in entries:
        if entry.arch not in reg._model_default_cfgs:
            raise RuntimeError(f"timm has no architecture {entry.arch!r} with pretrained cfgs (zoo entry {entry.name})")
        cfg = pretrained_cfg(entry)
        default = reg._model_default_cfgs[entry.arch]
        if entry.tag not in default.tags:
            default.tags.append(entry.tag)  # appended: timm's default tag for the architecture stays first
        default.cfgs[entry.tag] = cfg
        reg._model_pretrained_cfgs[entry.name] = cfg
        if entry.name not in reg._model_with_tags[entry.arch]:
            reg._model_with_tags[entry.arch].append(entry.name)
        if has_weights(entry):
            reg._model_has_pretrained.add(entry.name)
        else:
            reg._model_has_pretrained.discard(entry.name)


def install_loader_hook() -> None:
    """Route timm's weight loading for zoo tags through :func:`scan_zoo.zoo.hub.load_verified`.

    ``hf-hub:`` and ``local-dir:`` names are left to timm (their config comes from the repository).
    """

    original = getattr(_builder, "load_pretrained", None)
    if not callable(original):
        raise RuntimeError(
            "timm.models._builder.load_pretrained is gone: scan_zoo cannot verify zoo weights; "
            "update scan_zoo.zoo.timm_bridge.install_loader_hook"
        )
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def load_pretrained(model, pretrained_cfg=None, *args, **kwargs):
        cfg = pretrained_cfg or getattr(model, "pretrained_cfg", None) or {}
        entry = None
        if cfg.get("source") not in ("hf-hub", "local-dir"):
            entry = find_entry(cfg.get("architecture"), cfg.get("tag"))
        if entry is not None:
            state = hub.load_verified(entry, cache_dir=kwargs.get("cache_dir"))
            cfg = {**cfg, "state_dict": state, "file": None, "hf_hub_id": None}
        return original(model, cfg, *args, **kwargs)

    setattr(load_pretrained, _MARK, True)
    _builder.load_pretrained = load_pretrained


def install() -> None:
    register_tags()
    install_loader_hook()
