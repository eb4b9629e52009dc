"""The zoo's registry inside timm: tags, explicit preprocessing, recipe-only entries, verified loading, export."""

import json
import time

import pytest
import timm
import torch
from helpers import ROOT
from safetensors.torch import load_file, save_file

import scan_zoo
from scan_zoo.common.errors import UserError
from scan_zoo.common.files import sha256_file
from scan_zoo.zoo import registry, timm_bridge
from scan_zoo.zoo.hub import (
    check_filename,
    check_repo_id,
    export,
    load_verified,
    verify_export,
)

ARCH_DEFAULT_MEAN = {e.arch: timm.models.get_pretrained_cfg(e.arch).mean for e in registry.ENTRIES}


@pytest.fixture
def lock(tmp_path, monkeypatch):
    """A private lock file, so tests can record facts without touching the package's."""
    path = tmp_path / "zoo_lock.json"
    monkeypatch.setenv("SCAN_ZOO_LOCK", str(path))
    return path


@pytest.mark.parametrize("name", registry.list_models())
def test_every_entry_is_a_timm_tag_with_its_own_preprocessing(name):
    entry = registry.get_entry(name)
    cfg = timm.models.get_pretrained_cfg(name)
    assert (cfg.architecture, cfg.tag) == (entry.arch, entry.tag)
    assert cfg.input_size == (3, entry.preprocess.image_size, entry.preprocess.image_size)
    assert cfg.mean == tuple(entry.preprocess.mean) and cfg.std == tuple(entry.preprocess.std)
    assert cfg.crop_pct == entry.preprocess.crop_pct and cfg.interpolation == entry.preprocess.interpolation
    assert cfg.num_classes == 0 and cfg.classifier  # headless, but timm's classifier name kept
    assert name in timm.list_models(f"{entry.arch}*", include_tags=True)


def test_preprocessing_is_not_inherited_from_timms_default_tag():
    # test_resnet's own default tag normalises with 0.5; the digits weights were trained with ImageNet's mean
    assert ARCH_DEFAULT_MEAN["test_resnet"] == (0.5, 0.5, 0.5)
    assert timm.create_model("test_resnet.scan_digits").pretrained_cfg["mean"] == registry.IMAGENET_MEAN


def test_list_pretrained_shows_exactly_the_entries_with_weights():
    listed = set(timm.list_pretrained("*scan*"))
    with_weights = {e.name for e in registry.ENTRIES if "scan" in e.name and e.has_weights}
    assert with_weights <= listed
    assert not {e.name for e in registry.ENTRIES if not e.has_weights} & listed
    assert "resnet50.a1_in1k" in timm.list_pretrained("resnet50.*")  # timm's own tags untouched
    assert timm.models.get_pretrained_cfg("resnet50").tag == "a1_in1k"  # ... and its default tag too


def test_headless_by_default_and_num_classes_adds_a_head():
    m = timm.create_model("resnet18.scan_in1k")
    assert m.num_classes == 0 and m(torch.zeros(1, 3, 64, 64)).shape == (1, 512)
    m = timm.create_model("resnet18.scan_in1k", num_classes=7)
    assert m.fc.out_features == 7


def test_a_recipe_entry_never_loads_random_weights_silently(lock):
    with pytest.raises(UserError, match="recipe.*scan_in1k"):
        timm.create_model("resnet50.scan_in1k", pretrained=True)


def test_registration_fails_loudly_when_timm_internals_move(monkeypatch):
    from timm.models import _registry

    monkeypatch.delattr(_registry, "_model_with_tags")
    with pytest.raises(RuntimeError, match="registry internals"):
        timm_bridge.register_tags()


def test_loader_hook_fails_loudly_when_timm_internals_move(monkeypatch):
    from timm.models import _builder

    monkeypatch.delattr(_builder, "load_pretrained")
    with pytest.raises(RuntimeError, match="load_pretrained"):
        timm_bridge.install_loader_hook()


def test_loader_hook_is_installed_once():
    from timm.models import _builder

    before = _builder.load_pretrained
    timm_bridge.install_loader_hook()
    assert _builder.load_pretrained is before and getattr(before, "_scan_zoo_hook")


@pytest.mark.parametrize(
    "repo_id",
    [
        "../etc",
        "/abs/path",
        "org/../x",
        "https://evil/x",
        "a/b/c",
        "org",
        "",
        "org/na me",
        "file:org/x",
        "org/x\n",
        "org/..",
    ],
)
def test_path_tricks_in_repo_ids_are_refused(repo_id):
    with pytest.raises(UserError, match="not a Hub repository id"):
        check_repo_id(repo_id)


@pytest.mark.parametrize("name", ["../model.safetensors", "/etc/passwd", "a/../../b", "http://x/y", "C:\\x", ""])
def test_path_tricks_in_file_names_are_refused(name):
    with pytest.raises(UserError, match="refusing file name"):
        check_filename(name)


def test_good_ids_and_names_pass():
    assert check_repo_id("scan-zoo/resnet50.scan_in1k") == "scan-zoo/resnet50.scan_in1k"
    assert check_filename("model.safetensors") == "model.safetensors"


def _fake_run(tmp_path, arch="test_resnet", method="scan", seed=0):
    """A run directory as train.py leaves it: model.safetensors (plain timm keys) + config.json."""
    from scan_zoo.models.backbones import (
        create_backbone,
        data_config_for,
        export_backbone,
    )

    torch.manual_seed(seed)
    model = create_backbone(arch)
    run = tmp_path / f"run_{arch}_{method}_{seed}"
    export_backbone(
        model,
        run,
        data_config_for(32, 32, registry.IMAGENET_MEAN, registry.IMAGENET_STD),
        {"method": method, "steps": 3, "epochs": 1, "num_train_images": 10, "config": {"lr": 0.1}},
    )
    return run, model


def test_export_writes_weights_config_and_a_card_that_plain_timm_loads(tmp_path, lock):
    run, model = _fake_run(tmp_path)
    out = export(run, "test_resnet.scan_digits", tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and cfg["num_classes"] == 0
    assert cfg["pretrained_cfg"]["mean"] == list(registry.IMAGENET_MEAN)
    assert "scan_zoo" not in cfg["pretrained_cfg"] and cfg["scan_zoo"]["sha256"] == sha256_file(
        out / "model.safetensors"
    )
    card = (out / "README.md").read_text()
    assert "Supervised Contrastive Adjustment in Neighborhood" in card and "Van Gansbeke" in card
    assert "features_only=True" in card and "@article{wei2020scan" in card
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    verify_export(out)


def test_export_refuses_a_run_of_another_architecture_or_method(tmp_path):
    run, _ = _fake_run(tmp_path, method="moco")
    with pytest.raises(UserError, match="trained with --method moco"):
        export(run, "test_resnet.scan_digits", tmp_path / "x")
    with pytest.raises(UserError, match="test_resnet, but resnet50.scan_in1k is a resnet50"):
        export(run, "resnet50.scan_in1k", tmp_path / "y")
    with pytest.raises(UserError, match="not in the zoo"):
        export(run, "test_resnet.nothing", tmp_path / "z")


def test_a_tampered_export_fails_verification(tmp_path):
    run, _ = _fake_run(tmp_path)
    out = export(run, "test_resnet.scan_digits", tmp_path / "export")
    state = load_file(str(out / "model.safetensors"))
    state["conv1.0.weight"] = state["conv1.0.weight"] + 1e-3
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(UserError, match="sha256 mismatch.*expected [0-9a-f]{64}, got [0-9a-f]{64}"):
        verify_export(out)


def test_shipped_weights_load_verified_and_a_tampered_copy_is_refused(tmp_path, monkeypatch, lock):
    run, model = _fake_run(tmp_path)
    weights_root = tmp_path / "weights"
    monkeypatch.setattr(registry, "WEIGHTS_DIR", weights_root)
    entry = registry.get_entry("test_resnet.scan_digits")
    out = export(run, entry.name, entry.weights_dir)
    registry.record(entry.name, {"sha256": sha256_file(out / "model.safetensors")})
    loaded = timm.create_model(entry.name, pretrained=True)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    feats = timm.create_model(entry.name, pretrained=True, features_only=True).eval()(torch.zeros(1, 3, 32, 32))
    assert len(feats) >= 3 and feats[0].shape[-1] > feats[-1].shape[-1]  # several scales
    with open(out / "model.safetensors", "r+b") as f:  # flip one byte of the payload
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(UserError, match="sha256 mismatch for test_resnet.scan_digits"):
        load_verified(entry)
    with pytest.raises(UserError, match="sha256 mismatch"):
        timm.create_model(entry.name, pretrained=True)


def test_a_file_changed_after_a_remembered_check_is_hashed_again(tmp_path, monkeypatch):
    """The per-process memory of checked files: same size, new content -> hashed again and refused."""
    from scan_zoo.zoo import hub

    monkeypatch.setattr(hub, "_VERIFIED", {})
    monkeypatch.setattr(hub, "VERIFIED_MIN_AGE_S", 0.05)
    hashed = []
    monkeypatch.setattr(hub, "sha256_file", lambda p: hashed.append(p) or sha256_file(p))
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"a" * 1000)
    good = sha256_file(path)
    hub.verify_sha256(path, good, "fresh")
    hub.verify_sha256(path, good, "fresh")
    assert len(hashed) == 2  # changed within VERIFIED_MIN_AGE_S of the check: not remembered
    time.sleep(0.1)
    hub.verify_sha256(path, good, "old enough")
    hub.verify_sha256(path, good, "old enough")
    assert len(hashed) == 3  # remembered: the second check read nothing
    with open(path, "r+b") as f:  # same size, one byte changed, in place (same inode)
        f.seek(500)
        f.write(b"b")
    with pytest.raises(UserError, match="sha256 mismatch for changed"):
        hub.verify_sha256(path, good, "changed")
    assert len(hashed) == 4
    path.write_bytes(b"a" * 1000)  # the original content back: still hashed before it is trusted
    hub.verify_sha256(path, good, "restored")
    assert len(hashed) == 5


def test_weights_without_a_recorded_sha256_are_refused(tmp_path, monkeypatch, lock):
    run, _ = _fake_run(tmp_path)
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path / "weights")
    entry = registry.get_entry("test_resnet.scan_digits")
    export(run, entry.name, entry.weights_dir)
    with pytest.raises(UserError, match="no sha256"):
        load_verified(entry)


def test_scan_zoo_list_shows_every_entry(capsys):
    from scan_zoo.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in registry.list_models():
        assert name in out
    assert main(["list", "*digits", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == registry.list_models("*digits")


def test_readme_zoo_table_is_generated_from_the_registry():
    from scan_zoo.experiments.results_page import update_readme

    text = (ROOT / "README.md").read_text()
    assert update_readme(text, ROOT) == text, "README's zoo table is stale: run `scan-zoo readme`"
    for name in registry.list_models():
        assert f"`{name}`" in text


def test_public_api():
    assert scan_zoo.list_models("*scan_in1k") == [e.name for e in registry.ENTRIES if e.tag == "scan_in1k"]
    assert scan_zoo.get_entry("resnet50.scan_in1k").recipe == "scan_in1k"


def test_a_small_file_is_read_once_and_its_checked_bytes_are_the_ones_loaded(tmp_path, monkeypatch, lock):
    from scan_zoo.zoo import hub

    run, model = _fake_run(tmp_path)
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setattr(hub, "_VERIFIED", {})
    entry = registry.get_entry("test_resnet.scan_digits")
    out = export(run, entry.name, entry.weights_dir)
    registry.record(entry.name, {"sha256": sha256_file(out / "model.safetensors")})
    monkeypatch.setattr(hub, "load_file", None, raising=False)  # not used by the one-read path
    read_once = hub.load_verified(entry)
    monkeypatch.setattr(hub, "READ_ONCE_MAX_BYTES", 0)  # the block-hash + memory-map path
    mapped = hub.load_verified(entry)
    assert read_once.keys() == mapped.keys() == model.state_dict().keys()
    assert all(torch.equal(read_once[k], mapped[k]) for k in read_once)
    assert hub.verify_sha256(out / "model.safetensors", sha256_file(out / "model.safetensors"), "x", read=True)
    with open(out / "model.safetensors", "r+b") as f:  # tampered: refused on the one-read path too
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    monkeypatch.setattr(hub, "READ_ONCE_MAX_BYTES", 1 << 30)
    with pytest.raises(UserError, match="sha256 mismatch for test_resnet.scan_digits"):
        hub.load_verified(entry)
