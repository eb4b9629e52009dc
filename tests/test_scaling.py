"""The linear lr scaling rule of docs/cluster.md, against hand computation and the paper's stated setting."""

import math
from pathlib import Path

import pytest
import yaml

from scan_zoo.core.schedules import global_batch, scale_lr
from scan_zoo.train.config import TrainConfig, load_yaml

SCAN_RECIPE = Path(__file__).resolve().parents[1] / "scan_zoo" / "recipes" / "scan_in1k.yaml"


def test_paper_setting_gives_paper_lr():
    # Wei et al. Sec. 4.1: 128 anchors + their top-2 neighbours per GPU (384 images), 32 GPUs, lr 1.6
    batch = global_batch(128 * (2 + 1), 32)
    assert batch == 12288
    assert scale_lr(1.6, batch, 12288) == 1.6


def test_recipe_file_states_the_paper_setting():
    cfg = TrainConfig(**load_yaml(SCAN_RECIPE))
    processes = yaml.safe_load(SCAN_RECIPE.read_text())["_meta"]["processes"]["value"]
    assert (cfg.batch_size, processes, cfg.lr, cfg.k) == (384, 32, 1.6, 2)
    assert scale_lr(cfg.lr, global_batch(cfg.batch_size, processes), 32 * 384) == cfg.lr


@pytest.mark.parametrize(
    "processes, per_process, want",
    [
        (8, 384, 0.4),  # one node of 8: 3,072 images = 12,288 / 4 -> 1.6 / 4
        (64, 384, 3.2),  # 8 nodes: twice the paper's batch
        (32, 192, 0.8),  # 64 anchors per GPU instead of 128
        (1, 384, 0.05),  # one process: 384 / 12,288 = 1 / 32
    ],
)
def test_hand_computed_scan(processes, per_process, want):
    assert math.isclose(scale_lr(1.6, global_batch(per_process, processes), 12288), want, rel_tol=1e-12)


def test_moco_v2_reference():
    # MoCo-v2: lr 0.03 for 256 images (8 x 32); 4 nodes x 8 GPUs x 32 images = 1,024 -> 0.12
    assert math.isclose(scale_lr(0.03, global_batch(32, 32), 256), 0.12, rel_tol=1e-12)


@pytest.mark.parametrize(
    "args", [(0.0, 1, 1), (-1.0, 1, 1), (float("nan"), 1, 1), (float("inf"), 1, 1), (0.1, 0, 1), (0.1, 1, 0)]
)
def test_bad_arguments(args):
    with pytest.raises(ValueError):
        scale_lr(*args)


def test_bad_process_count():
    with pytest.raises(ValueError):
        global_batch(384, 0)
