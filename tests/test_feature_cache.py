"""The feature cache is verified: a cache file whose bytes changed after it was written, or that records other
inputs than its name claims, is recomputed with one warning line, never used as a hit."""

import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, run_cli

from scan_zoo.data import datasets as data_lib
from scan_zoo.models.backbones import create_backbone, data_config_for, export_backbone

SIZE = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    export_backbone(
        create_backbone("test_resnet"),
        out,
        data_config_for(SIZE, None, data_lib.IMAGENET_MEAN, data_lib.IMAGENET_STD),
        {"method": "test"},
    )
    return out


def probe_run(model_dir: Path, data: Path, cache: Path, out: Path):
    return run_cli(
        [
            PYTHON,
            "eval_linear.py",
            str(model_dir),
            "--data",
            str(data),
            "--protocol",
            "cached",
            "--epochs",
            "3",
            "--batch-size",
            "16",
            "--milestones",
            "2",
            "--num-workers",
            "0",
            "--no-progress",
            "--cache-dir",
            str(cache),
            "--out",
            str(out),
        ],
        timeout=300,
    )


def overwrite_tensor(path: Path, name: str, values: torch.Tensor) -> None:
    """Write ``values`` over tensor ``name``'s bytes inside a safetensors file, leaving header and size as they are."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + n])[name]["data_offsets"]
    data = values.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    assert len(data) == end - begin
    path.write_bytes(raw[: 8 + n + begin] + data + raw[8 + n + end :])


def test_changed_cache_bytes_are_recomputed_not_used(model_dir, tiny_data, tmp_path):
    cache = tmp_path / "cache"
    first = probe_run(model_dir, tiny_data, cache, tmp_path / "first.json")
    assert first.returncode == 0, first.stderr
    (cache_file,) = cache.glob("*.safetensors")
    reference = json.loads((tmp_path / "first.json").read_text())["cached"]
    assert not reference["feature_cache"]["hit"]

    from safetensors.torch import load_file

    labels = load_file(str(cache_file))["train_labels"].clone()  # not a view of the file about to change
    overwrite_tensor(cache_file, "train_labels", torch.zeros_like(labels))  # every training feature now "class 0"
    second = probe_run(model_dir, tiny_data, cache, tmp_path / "second.json")
    assert second.returncode == 0, second.stderr
    warnings = [ln for ln in second.stderr.splitlines() if "feature cache" in ln]
    assert len(warnings) == 1 and "recomputing" in warnings[0] and "sha256" in warnings[0], second.stderr
    again = json.loads((tmp_path / "second.json").read_text())["cached"]
    assert not again["feature_cache"]["hit"]
    assert (again["top1"], again["knn"]) == (reference["top1"], reference["knn"])
    assert torch.equal(load_file(str(cache_file))["train_labels"], labels)  # the cache was rewritten whole

    third = probe_run(model_dir, tiny_data, cache, tmp_path / "third.json")  # and is a verified hit again
    assert third.returncode == 0 and "feature cache" not in third.stderr, third.stderr
    assert json.loads((tmp_path / "third.json").read_text())["cached"]["feature_cache"]["hit"]


def test_a_cache_file_recording_other_inputs_is_not_a_hit(model_dir, tiny_data, tmp_path):
    """A valid cache of other data copied under this key's name: its recorded key inputs give it away."""
    from scan_zoo.eval import probe
    from scan_zoo.models.loading import load_backbone

    backbone, _ = load_backbone(str(model_dir))
    train, val = probe.load_splits(tiny_data)
    cfg = probe.resolve_config(
        probe.ProbeConfig(num_workers=0, progress=False, cache_dir=str(tmp_path / "c")),
        {"image_size": SIZE, "mean": data_lib.IMAGENET_MEAN, "std": data_lib.IMAGENET_STD},
        "tiny",
    )
    feats = probe.centre_crop_features(backbone, train, val, cfg)
    path = Path(feats["cache_path"])
    other = dict(cfg.__dict__, eval_resize=SIZE + 4)
    other_feats = probe.centre_crop_features(backbone, train, val, probe.ProbeConfig(**other))
    Path(other_feats["cache_path"]).replace(path)  # the other settings' file, under this key's name
    _, what = probe.cache_key(backbone, train, val, cfg)
    tensors, problem = probe.read_feature_cache(path, what)
    assert tensors is None and "other weights, data or settings" in problem
    again = probe.centre_crop_features(backbone, train, val, cfg)
    assert not again["cache_hit"] and torch.equal(again["train_features"], feats["train_features"])
