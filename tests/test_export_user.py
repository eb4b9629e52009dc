"""`scan-zoo export RUN --name ORG/MODEL`: a real train.py run exported under the user's own name.

Every claim of the card is checked against the run's own files (config.yaml, the checkpoint's
train_state.json, eval_results.json), the exported weights load strictly into plain timm, and timm's
transform from config.json is the transform the card's numbers were measured with.
"""

import json
import re
import shlex
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml
from helpers import COMMON, PYTHON, run_cli
from PIL import Image
from safetensors.torch import load_file

from scan_zoo.cli import main as scan_zoo_main
from scan_zoo.common.recipes import recipe_path

NAME = "my-org/my-model"
STEPS = 3


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 3-step MoCo run on the digit scenes, evaluated once by eval_linear.py (2 epochs)."""
    tmp = tmp_path_factory.mktemp("user_run")
    cache, run = tmp / "digits", tmp / "run"
    p = run_cli(
        [
            PYTHON,
            "train.py",
            "--method",
            "moco",
            "--config",
            "digits_moco",
            "--data",
            "digits",
            "--data-cache",
            str(cache),
            *COMMON,
            "--max-steps",
            str(STEPS),
            "--batch-size",
            "8",
            "--queue-size",
            "16",
            "--output-dir",
            str(run),
        ]
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return {"run": run, "cache": cache, "features": tmp / "features"}


def _eval(model: str, run: dict, *extra: str):
    return run_cli(
        [
            PYTHON,
            "eval_linear.py",
            model,
            "--data",
            "digits",
            "--data-cache",
            str(run["cache"]),
            "--num-workers",
            "0",
            "--no-progress",
            "--cache-dir",
            str(run["features"]),
            *extra,
        ]
    )


def _identity(cfg: dict) -> dict:
    from scan_zoo.train.identity import identity_fields

    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in identity_fields()}


def _check_card_against_run(card: str, run_dir: Path) -> None:
    """Method, steps, data, fingerprint, recipe + overrides: each read from the run, each on the card."""
    from scan_zoo.train.checkpoints import list_checkpoints
    from scan_zoo.train.config import build_config, load_yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    state = json.loads((list_checkpoints(run_dir)[-1] / "train_state.json").read_text())
    assert "build-digits" not in card  # the old card claimed the zoo build trained every export
    assert "**MoCo-v2**" in card and cfg["method"] == "moco"
    assert f"{state['step']} optimiser steps" in card and state["step"] == STEPS
    assert "`--data digits`" in card and cfg["data"] == "digits"
    assert state["data"]["files"] in card and f"{state['data']['num_images']} training images" in card
    assert "Van Gansbeke" in card  # which SCAN
    # the recipe the card names, with the values it says differ, gives the run's config (the real parser)
    command = re.search(r"A command with the same settings:\*\* `([^`]*)`", card).group(1)
    argv = shlex.split(command)[3:]
    recipe = argv[argv.index("--config") + 1]
    assert recipe == "digits_moco"
    flags = {a[2:].replace("-", "_"): v for a, v in zip(argv[::2], argv[1::2]) if a != "--config"}
    rebuilt = build_config(load_yaml(recipe_path(recipe)), flags).to_dict()
    assert _identity(rebuilt) == _identity(cfg)
    for key in [k for k in flags if k != "data"]:  # each listed override really differs from the recipe
        assert f"`{key}`" in card


def test_hostile_names_are_one_line_and_exit_2(tmp_path, capsys):
    for name in (
        "../evil",
        "org/..",
        "a/b/c",
        "org/",
        "/org",
        "org//x",
        "",
        "org/na me",
        "org/na\u00efve",
        "a--b/c",
        "org/-x",
        "org/x\n",
        "org/x\\y",
        "hf://org/x",
        "test_resnet.nothing",
        "org/" + "x" * 97,
    ):
        assert scan_zoo_main(["export", str(tmp_path), "--name", name, "--out", str(tmp_path / "o")]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("scan-zoo: error: --name") and err.count("\n") == 1, (name, err)
    assert not (tmp_path / "o").exists()
    p = run_cli([PYTHON, "-m", "scan_zoo.cli", "export", str(tmp_path), "--name", "../x", "--out", str(tmp_path / "o")])
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


@pytest.mark.slow
def test_an_unevaluated_run_gets_a_card_without_numbers(digits_run, tmp_path, capsys):
    from scan_zoo.eval import probe

    run = digits_run["run"]
    assert not (run / "eval_results.json").exists()
    out = tmp_path / "export"
    assert scan_zoo_main(["export", str(run), "--name", NAME, "--out", str(out)]) == 0, capsys.readouterr().err
    card = (out / "README.md").read_text()
    _check_card_against_run(card, run)
    assert "No number was measured" in card and "| protocol |" not in card and not (out / "eval_results.json").exists()
    # no number: config.json states eval_linear.py's default protocol for the digits (32 px, size / 0.875)
    default = probe.ProbeConfig()
    size = probe.DIGITS_SIZE
    resize = int(round(size / 0.875)) if default.eval_resize is None else default.eval_resize
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert cfg["crop_pct"] == size / resize and cfg["input_size"] == [3, size, size]


@pytest.mark.slow
def test_export_of_an_evaluated_run(digits_run, tmp_path, capsys):
    import timm

    from scan_zoo.data.datasets import eval_transform

    run = tmp_path / "run"  # a copy: the other tests see the run unevaluated
    shutil.copytree(digits_run["run"], run)
    p = _eval(str(run), digits_run, "--protocol", "cached", "--epochs", "2", "--milestones", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    results = json.loads((run / "eval_results.json").read_text())
    protocol = results["cached"]["protocol"]
    out = tmp_path / "export"
    assert scan_zoo_main(["export", str(run), "--name", NAME, "--out", str(out)]) == 0, capsys.readouterr().err
    card = (out / "README.md").read_text()
    _check_card_against_run(card, run)
    assert f"| cached | {results['cached']['top1']:.2f} |" in card
    assert f"{results['cached']['knn']['top1']:.2f}" in card

    # config.json: the transform of the numbers (Resize(37) + CenterCrop(32) on the digits)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pretrained_cfg"]["crop_pct"] == protocol["image_size"] / protocol["eval_resize"]
    assert cfg["pretrained_cfg"]["interpolation"] == protocol["interpolation"]
    assert (protocol["image_size"], protocol["eval_resize"]) == (32, 37)

    # plain timm: strict load of the exported weights, and its transform equals the protocol's
    model = timm.create_model(
        "test_resnet", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))
    )
    exported = load_file(str(out / "model.safetensors"))
    assert set(model.state_dict()) == set(exported)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exported.items())
    folder_model = timm.create_model(f"local-dir:{out}", pretrained=True)  # timm reads config.json itself
    assert all(torch.equal(folder_model.state_dict()[k], v) for k, v in exported.items())
    timm_tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=folder_model))
    ours = eval_transform(protocol["image_size"], protocol["eval_resize"], protocol["mean"], protocol["std"])
    for path in sorted((digits_run["cache"]).rglob("*.png"))[:3]:
        img = Image.open(path).convert("RGB")
        assert torch.equal(timm_tf(img), ours(img)), path

    # the card's command measures the same numbers again on the exported folder
    command = re.search(r"- `cached`: `([^`]*)`", card).group(1)
    argv = shlex.split(command)[2:]
    argv[0] = str(out)
    p = _eval(argv[0], digits_run, *argv[1:], "--out", str(tmp_path / "again.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    again = json.loads((tmp_path / "again.json").read_text())["cached"]
    assert again["knn"]["top1"] == results["cached"]["knn"]["top1"]
    assert again["top1"] == pytest.approx(results["cached"]["top1"], abs=0.5)


@pytest.mark.slow
def test_output_folder_checks(digits_run, tmp_path, capsys, monkeypatch):
    run = digits_run["run"]
    monkeypatch.chdir(tmp_path)
    assert scan_zoo_main(["export", str(run), "--name", NAME]) == 0  # default: under runs/, never the cwd itself
    assert {"README.md", "config.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "runs" / "export" / NAME).iterdir()
    }
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert scan_zoo_main(["export", str(run), "--name", NAME, "--out", str(taken)]) == 2
    assert "not empty" in capsys.readouterr().err and not (taken / "model.safetensors").exists()
    outside = tmp_path / "outside.md"
    outside.write_text("not yours")
    (taken / "README.md").symlink_to(outside)
    assert scan_zoo_main(["export", str(run), "--name", NAME, "--out", str(taken), "--force"]) == 0
    assert outside.read_text() == "not yours" and not (taken / "README.md").is_symlink()
    assert (taken / "notes.txt").read_text() == "mine"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert scan_zoo_main(["export", str(run), "--name", NAME, "--out", str(link), "--force"]) == 2
    assert "symbolic link" in capsys.readouterr().err and not (tmp_path / "elsewhere").exists()
    assert scan_zoo_main(["export", str(run), "--name", NAME, "--out", str(run), "--force"]) == 2
    assert "run directory itself" in capsys.readouterr().err


def test_the_recipe_diff_names_every_value_that_changes_the_weights():
    from scan_zoo.experiments.user_export import recipe_facts
    from scan_zoo.train.config import TrainConfig, build_config, load_yaml

    recipe = load_yaml(recipe_path("digits_supcon"))
    cfg = build_config(recipe, {"lr": 0.123, "seed": 7, "num_workers": 0}).to_dict()
    facts = recipe_facts(cfg, None)
    assert facts["path"] == "digits_supcon"
    assert {k for k, _, _ in facts["differences"]} == {"lr", "seed"}  # num_workers cannot change the weights
    recorded = recipe_facts(cfg, "digits_scan")  # a recipe the run names is the one compared with
    assert recorded["path"] == "digits_scan" and recorded["how"] == "recorded by the run"
    assert ("method", "supcon", "scan") in recorded["differences"]
    defaults = build_config({"method": "moco"}).to_dict()  # no recipe file: train.py's defaults are closest
    facts = recipe_facts(defaults, None)
    assert facts["path"] is None
    assert facts["differences"] == [("method", "moco", {f.name: f.default for f in fields(TrainConfig)}["method"])]


def test_a_folder_that_is_not_a_train_py_run_is_one_line(tmp_path, capsys):
    import timm

    from scan_zoo.data.datasets import IMAGENET_MEAN, IMAGENET_STD
    from scan_zoo.models.backbones import data_config_for, export_backbone

    bare = tmp_path / "bare"  # weights and config.json, but no training config: a converted or foreign model
    export_backbone(
        timm.create_model("test_resnet", num_classes=0),
        bare,
        data_config_for(16, 16, IMAGENET_MEAN, IMAGENET_STD),
        {"converted_from": "x"},
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("[1, 2]")
    for run, words in (
        (bare, "records no training config"),
        (broken, "config.json"),
        (tmp_path / "none", "no config.json"),
    ):
        assert scan_zoo_main(["export", str(run), "--name", NAME, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("scan-zoo: error:") and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "o").exists()
