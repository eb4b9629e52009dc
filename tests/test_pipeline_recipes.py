"""The pipeline's recipes: shipped in the package, chosen by the data, lr scaled to the global batch, printed."""

from pathlib import Path

import pytest
import yaml
from helpers import COMMON, PYTHON, make_image_folder, run_cli

from scan_zoo.common.errors import UserError
from scan_zoo.common.recipes import RECIPES_DIR, list_recipes, recipe_path, reference_processes, scaled_lr
from scan_zoo.experiments.pipeline import format_timings, stage_config, stage_recipes

SHIPPED = (
    "digits_moco",
    "digits_scan",
    "moco_v2_in1k",
    "scan_in1k",
    "supcon_in1k",
    "sup_in1k",
    "dsc_in1k",
    "digits_dsc",
    "digits_supcon",
    "digits_supervised",
)


def raw(name: str) -> dict:
    """A recipe's values read straight from its YAML (``{value: ...}`` unwrapped), without scan_zoo's loader."""
    data = yaml.safe_load(
        (Path(__file__).resolve().parent.parent / "scan_zoo" / "recipes" / f"{name}.yaml").read_text()
    )
    return {k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in data.items()}


def test_recipes_are_package_data_found_by_name_or_path(tmp_path):
    assert set(list_recipes()) == set(SHIPPED)  # the accelerate launch config is not a training recipe
    assert RECIPES_DIR.parent.name == "scan_zoo"
    for name in SHIPPED:
        assert recipe_path(name) == recipe_path(f"{name}.yaml") == RECIPES_DIR / f"{name}.yaml"
    mine = tmp_path / "mine.yaml"
    mine.write_text("epochs: 3\n")
    assert recipe_path(str(mine)) == mine
    with pytest.raises(UserError, match="neither a file nor a shipped recipe.*scan_in1k"):
        recipe_path("scan_in1k_typo")


def test_the_data_chooses_the_recipes_unless_the_user_names_them(tmp_path):
    assert {s: p.stem for s, p in stage_recipes("digits").items()} == {"moco": "digits_moco", "scan": "digits_scan"}
    assert {s: p.stem for s, p in stage_recipes(str(tmp_path)).items()} == {"moco": "moco_v2_in1k", "scan": "scan_in1k"}
    chosen = stage_recipes(str(tmp_path), moco_config="digits_moco", scan_config="digits_scan")
    assert {s: p.stem for s, p in chosen.items()} == {"moco": "digits_moco", "scan": "digits_scan"}


def test_scaled_lr_is_proportional_to_the_global_batch():
    assert scaled_lr(0.03, 256, 256) == 0.03
    assert scaled_lr(0.03, 512, 256) == pytest.approx(2 * scaled_lr(0.03, 256, 256))
    assert scaled_lr(1.6, 384, 32 * 384) == pytest.approx(1.6 / 32)


def test_stage_config_scales_the_imagenet_lr_and_reports_what_differs(tmp_path):
    moco, scan = raw("moco_v2_in1k"), raw("scan_in1k")
    assert reference_processes(recipe_path("moco_v2_in1k")) == moco["_meta"]["processes"]["value"] == 8
    assert reference_processes(recipe_path("digits_moco")) is None
    fixed = {"method": "moco", "output_dir": str(tmp_path / "moco")}
    # the recipe's own process count: its lr as written
    cfg, diff = stage_config(recipe_path("moco_v2_in1k"), {"data": str(tmp_path)}, fixed, processes=8)
    assert cfg.lr == moco["lr"] and "lr" not in diff
    cfg, diff = stage_config(recipe_path("moco_v2_in1k"), {"data": str(tmp_path)}, fixed, processes=1)
    assert cfg.lr == pytest.approx(moco["lr"] * moco["batch_size"] / (moco["batch_size"] * 8))
    assert diff["lr"] == (moco["lr"], cfg.lr) and diff["data"][1] == str(tmp_path)
    cfg, _ = stage_config(
        recipe_path("scan_in1k"),
        {"batch_size": "96"},
        {"method": "scan", "output_dir": str(tmp_path / "scan")},
        processes=2,
    )
    assert cfg.lr == pytest.approx(scan["lr"] * 96 * 2 / (scan["batch_size"] * 32))
    cfg, diff = stage_config(recipe_path("moco_v2_in1k"), {"lr": "0.5"}, fixed, processes=1)
    assert cfg.lr == 0.5 and diff["lr"] == (moco["lr"], 0.5)  # the user's lr is used as given
    digits = raw("digits_moco")
    cfg, diff = stage_config(recipe_path("digits_moco"), {"max_steps": "5"}, fixed, processes=2)
    assert cfg.lr == digits["lr"] and set(diff) == {"max_steps", "output_dir"}  # no _meta.processes: as written


def test_format_timings_names_every_stage_that_ran():
    line = format_timings(
        {"moco": {"moco_seconds": 1.25}, "scan": {"mining_seconds": 0.5, "scan_seconds": 2.0, "knn_seconds": 3.0}}
    )
    assert line == (
        "wall time: stage 1/3 MoCo-v2 1.2 s, stage 2/3 mining 0.5 s, stage 3/3 SCAN 2.0 s, kNN evaluation 3.0 s"
    )
    assert format_timings({"moco": {"moco_seconds": 4.0}}) == "wall time: stage 1/3 MoCo-v2 4.0 s"


def test_help_shows_the_defaults_the_default_run_uses():
    out = run_cli([PYTHON, "train.py", "--help"])
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    moco, scan = raw("digits_moco"), raw("digits_scan")
    assert (
        f"--epochs INT training epochs (default: from the recipe (digits_moco: {moco['epochs']}, "
        f"digits_scan: {scan['epochs']})" in text
    )
    assert f"(digits_moco: {moco['queue_size']}, digits_scan: {scan['queue_size']})" in text
    assert f"(digits_moco: {moco['crop_scale_min']}, digits_scan: {scan['crop_scale_min']})" in text
    assert "--moco-config RECIPE" in text and "--scan-config RECIPE" in text


@pytest.mark.slow  # the whole pipeline, two short stages
def test_pipeline_on_an_image_folder_prints_the_imagenet_recipes(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=16)
    out = run_cli(
        [
            PYTHON,
            "train.py",
            "--data",
            str(data),
            "--output-dir",
            str(tmp_path / "run"),
            *COMMON,
            "--batch-size",
            "12",
            "--queue-size",
            "16",
            "--max-steps",
            "2",
            "--knn-k",
            "3",
        ]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    stages = [line for line in lines if line.startswith("stage ")]
    assert stages[0] == f"stage 1/3: MoCo-v2 pretraining (2 steps, recipe {recipe_path('moco_v2_in1k')})"
    assert stages[1].startswith("stage 2/3: neighbour mining (K=2 neighbours per image")
    assert stages[2] == f"stage 3/3: SCAN (2 steps, recipe {recipe_path('scan_in1k')})"
    assert "digits_" not in out.stdout
    moco = raw("moco_v2_in1k")
    assert f"  image_size = 16 (recipe: {moco['image_size']})" in lines
    assert f"  lr = {moco['lr'] * 12 / (moco['batch_size'] * 8)!r} (recipe: {moco['lr']})" in lines
    assert lines[-1].startswith("wall time: stage 1/3 MoCo-v2 ") and "stage 3/3 SCAN" in lines[-1]


def test_moco_config_is_refused_outside_the_pipeline():
    out = run_cli([PYTHON, "train.py", "--method", "moco", "--moco-config", "digits_moco"])
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "train.py: error: --moco-config and --scan-config name the pipeline's stage recipes: "
        "not used with --method moco"
    ]
