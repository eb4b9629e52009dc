"""Linear probing: the backbone stays bit-identical, the feature cache is reused and invalidated, both
protocols learn a separable problem, the last epoch is what is reported, and bad input gives one line."""

import dataclasses
import hashlib
import importlib.util
import json
import socket
from pathlib import Path

import pytest
import torch
from helpers import BIN, PYTHON, ROOT, make_image_folder, run_cli

from scan_zoo.common.errors import UserError
from scan_zoo.data import datasets as data_lib
from scan_zoo.eval import linear, probe
from scan_zoo.models import features as features_lib
from scan_zoo.models.backbones import create_backbone, data_config_for, export_backbone
from scan_zoo.models.loading import load_backbone

SIZE = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A randomly initialised test_resnet exported like a run (model.safetensors + config.json, 16 px)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    dc = data_config_for(SIZE, None, data_lib.IMAGENET_MEAN, data_lib.IMAGENET_STD)
    export_backbone(create_backbone("test_resnet"), out, dc, {"method": "test"})
    return out


def quick(protocol: str, tmp_path: Path, **kw) -> probe.ProbeConfig:
    """A resolved config: few epochs, small batches, no workers, a private cache."""
    cfg = probe.ProbeConfig(
        protocol=protocol,
        epochs=kw.pop("epochs", 10),
        batch_size=16,
        milestones=(6, 8),
        num_workers=0,
        progress=False,
        cache_dir=str(tmp_path / "cache"),
        **kw,
    )
    pre = {"image_size": SIZE, "mean": data_lib.IMAGENET_MEAN, "std": data_lib.IMAGENET_STD}
    return probe.resolve_config(cfg, pre, "tiny")


def state_bytes(module) -> dict:
    return {k: v.detach().clone().contiguous().view(-1).view(torch.uint8) for k, v in module.state_dict().items()}


def load_script():
    spec = importlib.util.spec_from_file_location("eval_linear", ROOT / "eval_linear.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------- backbone untouched
@pytest.mark.parametrize("protocol", probe.PROTOCOLS)
def test_probe_learns_separable_tints_and_leaves_backbone_bit_identical(protocol, model_dir, tiny_data, tmp_path):
    backbone, _ = load_backbone(str(model_dir))
    backbone.train()  # the probe must switch to eval mode itself (BN statistics frozen) and switch back
    before = state_bytes(backbone)
    train, val = probe.load_splits(tiny_data)
    r = probe.linear_probe(backbone, train, val, quick(protocol, tmp_path))
    after = state_bytes(backbone)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running_mean/var included
    assert backbone.training
    assert r["top1"] >= 90 and r["knn"]["top1"] >= 90, r  # 12 val images, classes separable by tint
    assert r["protocol"]["name"] == protocol and len(r["history"]) == 10


@pytest.mark.parametrize("target", ["layer1.0.conv1.weight", "layer1.0.bn1.running_mean"])
def test_check_raises_when_a_weight_or_buffer_changes(target, model_dir, tiny_data, tmp_path, monkeypatch):
    backbone, _ = load_backbone(str(model_dir))
    original = probe.train_epoch

    def perturbing_epoch(*args, **kwargs):
        loss = original(*args, **kwargs)
        with torch.no_grad():
            backbone.state_dict()[target].view(-1)[0] += 1e-3
        return loss

    monkeypatch.setattr(linear, "train_epoch", perturbing_epoch)
    train, val = probe.load_splits(tiny_data)
    with pytest.raises(probe.BackboneChanged, match=target.replace(".", r"\.")):
        probe.linear_probe(backbone, train, val, quick("cached", tmp_path, epochs=1))


def test_check_compares_bits_so_nan_weights_do_not_look_changed():
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
    before = probe.snapshot(m)
    probe.assert_unchanged(m, before)
    with torch.no_grad():
        m.bias[1] = torch.nextafter(m.bias[1], torch.tensor(1.0))  # one ulp
    with pytest.raises(probe.BackboneChanged, match="bias"):
        probe.assert_unchanged(m, before)


# ------------------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("protocol", probe.PROTOCOLS)
def test_results_are_bit_identical_at_one_and_two_threads(protocol, model_dir, tiny_data, tmp_path):
    """The caller's thread count changes no bit of the results (losses included), and is restored after."""
    backbone, _ = load_backbone(str(model_dir))
    train, val = probe.load_splits(tiny_data)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            r = probe.linear_probe(backbone, train, val, quick(protocol, tmp_path / str(len(runs)), epochs=4))
            assert torch.get_num_threads() == threads
            runs.append((r["history"], r["knn"], r["top1"]))
    finally:
        torch.set_num_threads(before)
    assert runs[0] == runs[1] == runs[2]  # fresh caches: extraction repeated at each thread count


def test_fixed_threads_restores_the_count_on_error():
    before = torch.get_num_threads()
    with pytest.raises(KeyError):
        with linear.fixed_threads(1):
            assert torch.get_num_threads() == 1
            raise KeyError
    assert torch.get_num_threads() == before


# --------------------------------------------------------------------------------------- feature cache
def test_cached_protocol_reuses_its_cache_and_invalidates_it(model_dir, tiny_data, tmp_path, monkeypatch):
    calls = []
    original = features_lib.extract_features

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return original(*args, **kwargs)

    monkeypatch.setattr(features_lib, "extract_features", counting)
    backbone, _ = load_backbone(str(model_dir))
    train, val = probe.load_splits(tiny_data)
    cfg = quick("cached", tmp_path, epochs=3)
    first = probe.linear_probe(backbone, train, val, cfg)
    assert len(calls) == 2 and not first["feature_cache"]["hit"]  # train and val extracted
    second = probe.linear_probe(backbone, train, val, cfg)
    assert len(calls) == 2 and second["feature_cache"]["hit"]  # nothing extracted again
    assert second["history"] == first["history"]
    other_size = probe.linear_probe(
        backbone, train, val, probe.resolve_config(dataclasses.replace(cfg, eval_resize=SIZE), {}, "tiny")
    )
    assert len(calls) == 4 and not other_size["feature_cache"]["hit"]  # transform settings are in the key
    with torch.no_grad():
        backbone.state_dict()["conv1.0.weight"].view(-1)[0] += 1e-3
    changed = probe.linear_probe(backbone, train, val, cfg)
    assert len(calls) == 6 and not changed["feature_cache"]["hit"]  # new weights, new key
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3


# ------------------------------------------------------------------------------- the script and JSON
def test_json_reports_the_last_epoch_and_keeps_both_protocols(model_dir, tiny_data, tmp_path, monkeypatch, capsys):
    """The last epoch is sabotaged (zero weights, bias for class 0): all 12 val images are called class 0,
    so the reported top-1 must be 4 / 12, although earlier epochs were better."""
    script = load_script()
    epochs, original, seen = 6, probe.train_epoch, []

    def sabotaged_last_epoch(classifier, optimizer, batches):
        loss = original(classifier, optimizer, batches)
        seen.append(1)
        if len(seen) == epochs:
            with torch.no_grad():
                classifier.weight.zero_()
                classifier.bias.copy_(torch.tensor([10.0, 0.0, 0.0]))
        return loss

    monkeypatch.setattr(linear, "train_epoch", sabotaged_last_epoch)
    common = [
        "--data",
        str(tiny_data),
        "--num-workers",
        "0",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "c"),
        "--batch-size",
        "16",
    ]
    assert (
        script.main(
            [
                str(model_dir),
                "--protocol",
                "moco",
                "--epochs",
                str(epochs),
                "--lr",
                "5",
                "--milestones",
                "2",
                "4",
                *common,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-3].split()[:3] == ["protocol", "data", "top-1"] and out[-1].startswith("moco")
    results = json.loads((model_dir / "eval_results.json").read_text())
    moco = results["moco"]
    assert moco["top1"] == pytest.approx(100 * 4 / 12)
    assert max(h["top1"] for h in moco["history"]) >= 90
    p = moco["protocol"]
    assert (p["epochs"], p["lr"], p["milestones"], p["batch_size"]) == (6, 5.0, [2, 4], 16)
    assert (p["momentum"], p["weight_decay"], p["image_size"], p["hflip"]) == (0.9, 0.0, SIZE, True)
    assert p["eval_resize"] == round(SIZE / 0.875) and "RandomResizedCrop" in p["train_transform"]
    assert [h["lr"] for h in moco["history"]] == pytest.approx([5, 5, 0.5, 0.5, 0.05, 0.05])
    assert moco["weights_sha256"] == hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert (moco["train_images"], moco["val_images"]) == (48, 12)
    assert (moco["knn"]["k"], moco["knn"]["temperature"]) == (20, 0.07)

    monkeypatch.setattr(linear, "train_epoch", original)
    assert script.main([str(model_dir), "--protocol", "cached", "--epochs", "3", *common]) == 0
    results = json.loads((model_dir / "eval_results.json").read_text())
    assert set(results) == {"moco", "cached"} and results["moco"] == moco  # merged, not overwritten
    assert results["cached"]["protocol"]["milestones"] == [60, 80]


def test_results_path():
    want = Path("runs/eval/hf-hub_timm_resnet50.a1_in1k/eval_results.json")
    assert probe.results_path("hf-hub:timm/resnet50.a1_in1k") == want
    assert probe.results_path("x", out="o.json") == Path("o.json")


def test_script_imports_without_side_effects(monkeypatch):
    monkeypatch.setattr("sys.argv", ["pytest", "--no-such-option"])
    script = load_script()  # would exit 2 if it parsed arguments at import
    assert script.build_parser().parse_args(["m"]).protocol == "cached"


def assert_one_error_line(code: int, err: str, *needles):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("eval_linear.py: error: "), err
    for n in needles:
        assert n in lines[-1], lines[-1]


def test_missing_data_directory_is_one_line(model_dir, tmp_path):
    p = run_cli([PYTHON, "eval_linear.py", str(model_dir), "--data", str(tmp_path / "missing"), "--no-progress"])
    assert_one_error_line(p.returncode, p.stderr, "data directory not found", str(tmp_path / "missing"))


def test_bad_input_is_one_line(model_dir, tiny_data, tmp_path, capsys):
    script = load_script()
    code = script.main(["resnet_9000", "--data", str(tiny_data), "--no-progress"])
    assert_one_error_line(code, capsys.readouterr().err, "unknown backbone", "resnet_9000")
    code = script.main([str(tmp_path / "no_model"), "--data", str(tiny_data), "--no-progress"])
    assert_one_error_line(code, capsys.readouterr().err, "not found")
    odd = make_image_folder(tmp_path / "odd", classes=2, per_class=2, val_per_class=1)
    (odd / "val" / "class_1").rename(odd / "val" / "class_9")
    code = script.main([str(model_dir), "--data", str(odd), "--no-progress"])
    assert_one_error_line(code, capsys.readouterr().err, "different classes", "class_9")
    with pytest.raises(SystemExit) as e:
        script.main([str(model_dir), "--protocol", "best-epoch"])
    assert_one_error_line(e.value.code, capsys.readouterr().err, "invalid choice")


# ------------------------------------------------------------------------------------- two processes
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", probe.PROTOCOLS)
def test_two_processes_give_the_one_process_result(protocol, model_dir, tiny_data, tmp_path):
    args = [
        "eval_linear.py",
        str(model_dir),
        "--data",
        str(tiny_data),
        "--protocol",
        protocol,
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--num-workers",
        "0",
        "--no-progress",
    ]
    one = run_cli([PYTHON, *args, "--cache-dir", str(tmp_path / "c1"), "--out", str(tmp_path / "one.json")])
    assert one.returncode == 0, one.stderr
    two = run_cli(
        [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            *args,
            "--cache-dir",
            str(tmp_path / "c2"),
            "--out",
            str(tmp_path / "two.json"),
        ],
        timeout=300,
    )
    assert two.returncode == 0, two.stderr
    r1 = json.loads((tmp_path / "one.json").read_text())[protocol]
    r2 = json.loads((tmp_path / "two.json").read_text())[protocol]
    assert [h["top1"] for h in r1["history"]] == [h["top1"] for h in r2["history"]]
    assert [h["loss"] for h in r1["history"]] == pytest.approx([h["loss"] for h in r2["history"]], rel=1e-4)
    assert r1["knn"] == r2["knn"]


def test_moco_crop_scale_defaults_to_mocos_and_to_half_on_the_digits():
    pre = {"image_size": 224, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    moco = probe.ProbeConfig(protocol="moco")
    assert probe.resolve_config(moco, pre, "/data/imagenet").crop_scale_min == 0.08
    assert probe.resolve_config(moco, pre, "digits").crop_scale_min == 0.5
    given = probe.ProbeConfig(protocol="moco", crop_scale_min=0.2)
    assert probe.resolve_config(given, pre, "digits").crop_scale_min == 0.2
    with pytest.raises(UserError, match="crop scale"):
        probe.ProbeConfig(protocol="moco", crop_scale_min=1.5).validate()


@pytest.mark.parametrize("protocol", probe.PROTOCOLS)
def test_validation_resize_keeps_mocos_ratio_on_every_data_set(protocol):
    """resize = crop / 0.875 (256 / 224) for ImageNet-sized models and for the 32-px digit scenes alike:
    the centre crop of an enlarged image brings validation objects closer to their size in the training
    crops (probe module docstring); an explicit resize wins."""
    pre = {"image_size": 224, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    cfg = probe.ProbeConfig(protocol=protocol)
    imagenet = probe.resolve_config(cfg, pre, "/data/imagenet")
    assert (imagenet.image_size, imagenet.eval_resize) == (224, 256)
    digits = probe.resolve_config(cfg, pre, "digits")
    assert (digits.image_size, digits.eval_resize) == (32, 37)
    settings = probe.protocol_settings(digits)
    assert settings["eval_transform"] == "Resize(37) + CenterCrop(32)"
    assert probe.resolve_config(dataclasses.replace(cfg, eval_resize=32), pre, "digits").eval_resize == 32
