"""A zoo entry as timm's ``PretrainedCfg``: what timm needs to build, preprocess and load it (the registry
and lock are the only inputs, so both the timm bridge and the Hub publisher can use it)."""

from __future__ import annotations

import timm
from timm.models import PretrainedCfg

from scan_zoo.common.errors import UserError
from scan_zoo.zoo.registry import ZooEntry


def entry_facts(entry: ZooEntry) -> dict:
    """The entry's lock facts, or none while the lock is malformed (its error is raised where weights are used)."""
    try:
        return entry.facts
    except UserError:
        return {}


def has_weights(entry: ZooEntry) -> bool:
    try:
        return entry.has_weights
    except UserError:
        return False


def entry_status(entry: ZooEntry) -> str:
    try:
        return entry.status
    except UserError:
        return "lock file malformed"


def pretrained_cfg(entry: ZooEntry):
    """The entry as a timm ``PretrainedCfg``: preprocessing explicit, headless, timm's classifier name kept."""
    arch_default = timm.models.get_pretrained_cfg(entry.arch)  # only for the classifier / first conv names
    facts, status = entry_facts(entry), entry_status(entry)
    hub_id = None
    if facts.get("hf_hub_id"):
        hub_id = f"{facts['hf_hub_id']}@{facts['revision']}" if facts.get("revision") else facts["hf_hub_id"]
    elif entry.hf_hub_id:
        hub_id = entry.hf_hub_id
    return PretrainedCfg(
        architecture=entry.arch,
        tag=entry.tag,
        file=str(entry.weights_dir / "model.safetensors") if status == "shipped" else None,
        hf_hub_id=hub_id,
        hf_hub_filename="model.safetensors",
        num_classes=0,
        classifier=arch_default.classifier if arch_default else None,
        first_conv=arch_default.first_conv if arch_default else None,
        license=entry.license,
        paper_name=entry.paper[0],
        paper_ids=entry.paper[1],
        notes=f"scan_zoo {entry.method} ({status})",
        **entry.preprocess.timm_fields(),
    )
