"""The transfer suite (scan_zoo.eval.transfer) and its benchmark (scan_zoo.experiments.bench): metrics against hand-computed
cases, the features_only weights, the suite on a random backbone, the bench end to end, the README text."""

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from scan_zoo.common.errors import UserError
from scan_zoo.core import transfer_metrics as M
from scan_zoo.eval import multiscale as MS
from scan_zoo.eval import transfer as T
from scan_zoo.eval import transfer_tasks as TT
from scan_zoo.experiments import bench as B
from scan_zoo.experiments import bench_runs as R
from scan_zoo.experiments import charts as C
from scan_zoo.experiments import k_ablation as KA
from scan_zoo.experiments import results_page as P


# ------------------------------------------------------------------------------------------- metrics
def test_box_iou_hand_computed():
    pred = [[0, 0, 2, 2], [0, 0, 4, 4], [0, 0, 1, 1], [5, 5, 6, 6], [1, 2, 3, 7]]
    target = [[1, 1, 3, 3], [1, 1, 3, 3], [1, 0, 2, 1], [0, 0, 1, 1], [1, 2, 3, 7]]
    # overlap 1x1 of two 2x2 boxes: 1 / (4 + 4 - 1); containment 4 / 16; touching (exclusive ends) 0;
    # disjoint 0; identical 1
    expected = [1 / 7, 0.25, 0.0, 0.0, 1.0]
    assert M.box_iou(pred, target).tolist() == pytest.approx(expected)
    assert M.box_iou([[2, 2, 2, 2]], [[2, 2, 2, 2]]).tolist() == [0.0]  # two empty boxes
    assert M.box_iou([[3, 0, 1, 2]], [[0, 0, 2, 2]]).tolist() == [0.0]  # inverted box: no area


def test_mean_iou_hand_computed():
    target = torch.tensor([[[1, 1], [0, 0]]])
    pred = torch.tensor([[[1, 0], [0, 0]]])
    # glyph: TP 1, FN 1 -> 1/2; background: TP 2, FP 1 -> 2/3
    miou, per_class = M.mean_iou(pred, target, 2)
    assert per_class == pytest.approx([2 / 3, 1 / 2])
    assert miou == pytest.approx((2 / 3 + 1 / 2) / 2)
    # dataset level: one confusion matrix over both images (a per-image mean would give another number)
    target2 = torch.cat([target, torch.zeros(1, 2, 2, dtype=torch.long)])
    pred2 = torch.cat([pred, torch.zeros(1, 2, 2, dtype=torch.long)])
    miou, per_class = M.mean_iou(pred2, target2, 2)
    assert per_class == pytest.approx([6 / 7, 1 / 2])
    assert miou == pytest.approx((6 / 7 + 1 / 2) / 2)
    # a class absent from prediction and target is NaN and left out of the mean
    miou, per_class = M.mean_iou(torch.zeros(1, 3, 3), torch.zeros(1, 3, 3), 2)
    assert miou == 1.0 and per_class[0] == 1.0 and math.isnan(per_class[1])


def test_r2_hand_computed_and_matches_sklearn():
    assert M.r2_score([1, 2, 3, 5], [1, 2, 3, 4]).tolist() == pytest.approx([1 - 1 / 5])  # SS_res 1, SS_tot 5
    assert M.r2_score([2.5] * 4, [1, 2, 3, 4]).tolist() == pytest.approx([0.0])  # predicting the mean
    assert M.r2_score([4, 3, 2, 1], [1, 2, 3, 4]).tolist() == pytest.approx([1 - 20 / 5])  # worse than the mean
    assert math.isnan(M.r2_score([1, 2], [3, 3]).item())  # constant target
    from sklearn.metrics import r2_score

    g = np.random.default_rng(0)
    y, p = g.normal(size=(50, 3)), g.normal(size=(50, 3))
    assert M.r2_score(p, y).numpy() == pytest.approx(r2_score(y, p, multioutput="raw_values"))


def test_ridge_matches_sklearn():
    from sklearn.linear_model import Ridge

    g = np.random.default_rng(1)
    x, y = g.normal(size=(40, 6)) * [1, 2, 3, 1, 1, 5] + 3, g.normal(size=(40, 2))
    for lam in (1e-3, 1.0, 30.0):
        ((w, b),) = M.ridge_fit(torch.tensor(x), torch.tensor(y), [lam])
        ref = Ridge(alpha=lam).fit(x, y)
        assert w.T.numpy() == pytest.approx(ref.coef_, abs=1e-8)
        assert b.numpy() == pytest.approx(ref.intercept_, abs=1e-8)


def test_ridge_select_prefers_small_lambda_on_clean_linear_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    y = x @ torch.randn(5, 2, generator=g, dtype=torch.float64)
    alpha, scores = M.ridge_select(x[:150], y[:150], x[150:], y[150:], [1e-4, 1.0, 100.0])
    assert alpha == 1e-4 and scores[0] == pytest.approx(1.0, abs=1e-4) and scores[0] > scores[1] > scores[2]


# -------------------------------------------------------------------------------------- features_only
def test_features_only_weights_equal_the_backbone():
    from scan_zoo.models.backbones import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone("test_resnet").eval()
    with torch.no_grad():  # non-default BN statistics, so buffers are compared too
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    model, unused = MS.features_only_model(backbone)
    own, src = model.state_dict(), backbone.state_dict()
    assert unused == [] and set(own) == set(src), "timm keeps the ResNet's module names in features_only"
    for k in own:
        assert torch.equal(own[k], src[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        levels = model(x)
        pooled = backbone(x)
    assert [f.shape[1] for f in levels] == model.feature_info.channels()
    assert torch.allclose(levels[-1].mean((2, 3)), pooled, atol=1e-5), "the last level, pooled, is the backbone"


def test_feature_state_dict_maps_getter_prefix_and_refuses_unknown_keys():
    state = {"a.weight": torch.ones(1), "b.bias": torch.zeros(1), "head.weight": torch.ones(2)}
    mapped, unused = MS.feature_state_dict(state, ["model.a.weight", "b.bias"])
    assert set(mapped) == {"model.a.weight", "b.bias"} and unused == ["head.weight"]
    with pytest.raises(UserError, match="layer1_0"):
        MS.feature_state_dict(state, ["layer1_0.weight"])


# ------------------------------------------------------------------------------------------- the suite
@pytest.fixture(scope="module")
def random_export(tmp_path_factory):
    from scan_zoo.data.datasets import IMAGENET_MEAN, IMAGENET_STD
    from scan_zoo.models.backbones import (
        create_backbone,
        data_config_for,
        export_backbone,
    )

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("random_test_resnet")
    export_backbone(create_backbone("test_resnet"), out, data_config_for(32, 32, IMAGENET_MEAN, IMAGENET_STD), {})
    return out


def test_transfer_scores_on_a_random_backbone(random_export, digits_root, tmp_path):
    cfg = T.TransferConfig.quick(cache_dir=str(tmp_path / "cache"), num_workers=0)
    r = T.transfer_scores(str(random_export), digits_root, seed=0, cfg=cfg)
    assert 0 <= r["semantic_top1"] <= 100 and 0 <= r["box_iou"] <= 100 and 0 <= r["seg_miou"] <= 100
    assert -1e6 < r["appearance_r2"] <= 100
    assert set(r["appearance_r2_by_factor"]) == {"position", "scale", "fg_colour", "bg_colour"}
    assert len(r["appearance_r2_per_target"]) == 9
    assert r["semantic_top1"] > 15, "even random features beat chance (10 %) on the digit scenes"
    assert r["seg_levels"][0] == [32, 16, 16] and r["features_only_unused_keys"] == []
    assert r["train_images"] == 5752 and r["val_images"] == 1436 and r["probe"]["epochs"] == 5
    # the same seed and weights give the same numbers (pooled features now come from the cache)
    again = T.transfer_scores(str(random_export), digits_root, seed=0, cfg=cfg)
    assert again["feature_cache"]["hit"]
    for key, _, _ in T.TASKS:
        assert again[key] == r[key], key


def test_digit_targets_follow_the_image_folder(digits_root):
    from scan_zoo.data.digits import load_metadata
    from scan_zoo.eval.probe import load_splits

    train, val = load_splits(digits_root)
    t = TT.digit_targets(digits_root, val, 32)
    meta = load_metadata(digits_root)
    row = list(meta["path"]).index(digits_root.joinpath(val.samples[7][0]).relative_to(digits_root).as_posix())
    assert t["bbox"][7].tolist() == meta["bbox"][row].tolist()
    assert torch.equal(t["mask"][7], torch.as_tensor(meta["mask"][row]).long())
    assert t["appearance"][7, 2].item() == pytest.approx(meta["scale"][row])
    assert t["label"].tolist() == [int(val.classes[y]) for y in val.targets]


# ----------------------------------------------------------------------------------------------- bench
def _bench_parser():
    p = argparse.ArgumentParser(prog="scan-zoo")
    B.add_parser(p.add_subparsers(dest="command", required=True))
    return p


def test_bench_parser_defaults():
    args = _bench_parser().parse_args(["bench", "transfer"])
    assert args.methods == ["supervised", "moco", "supcon", "scan", "dsc"] and args.seeds == [0, 1, 2]
    assert args.merge is None
    assert args.out == "runs/bench/transfer" and args.recipes_dir is None and not args.quick
    args = _bench_parser().parse_args(["bench", "k-ablation"])
    assert args.ks == ["0", "1", "2", "4", "8", "all"] and args.seed == 0 and args.out == "runs/bench/k_ablation"
    assert [KA.parse_k(k) for k in args.ks] == [0, 1, 2, 4, 8, "all"]
    with pytest.raises(UserError):
        KA.parse_k("-1")


def test_bench_recipes_exist_and_load():
    from scan_zoo.train.config import build_config, load_yaml

    for m in R.METHODS:
        cfg = build_config(load_yaml(R.recipe_file(None, m)))
        assert cfg.method == m and cfg.data == "digits"


def test_k_ablation_budget_keeps_steps_equal():
    assert KA.steps_for(126, 5752, 2) == math.ceil(5752 / 42)
    assert KA.steps_for(126, 5752, 0) == math.ceil(5752 / 126)
    assert KA.steps_for(126, 5752, "all") == math.ceil(5752 / 126)
    assert KA.steps_for(126, 5752, 8) == math.ceil(5752 / 14)
    with pytest.raises(UserError):
        KA.steps_for(8, 5752, 8)


def test_bench_transfer_quick_end_to_end(digits_root, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = [
        "bench",
        "transfer",
        "--methods",
        "moco",
        "scan",
        "--seeds",
        "0",
        "--quick",
        "--out",
        str(out),
        "--data-cache",
        str(digits_root),
        "--num-workers",
        "0",
    ]
    args = _bench_parser().parse_args(argv)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "MoCo-v2" in printed and "SCAN" in printed and "semantic" in printed
    result = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in result["runs"]] == [("moco", 0), ("scan", 0)]
    assert all(r["steps"] == R.QUICK_STEPS and r["trained_now"] for r in result["runs"])
    for key, _, _ in T.TASKS:
        assert set(result["summary"][key]) == {"moco", "scan"}
        assert result["summary"][key]["moco"]["std"] is None  # one seed
    scan_run = result["runs"][1]
    assert "--appearance-model" in scan_run["command"] and "seed0/moco" in scan_run["command"]
    assert set(result["recipes"]) == {"moco", "scan"} and result["quick"] and result["date"]
    png = out / "transfer.png"
    assert png.stat().st_size > 0
    with Image.open(png) as im:
        assert (
            im.size[0] > 200
            and im.size[1] > 200
            and len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 3
        )
    # resumable: nothing is trained or scored again
    assert args.func(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert not any(r["trained_now"] for r in again["runs"])
    assert again["summary"] == result["summary"]


def test_bench_transfer_merge_adds_dsc_without_retraining_the_others(digits_root, tmp_path, capsys):
    """--merge: a finished results.json keeps its other methods as recorded; only DSC is trained and scored."""
    tcfg = T.TransferConfig.quick(num_workers=0, cache_dir="/gone/feature_cache")
    old = {
        "kind": "transfer",
        "date": "2026-01-01T00:00:00+00:00",
        "command": "scan-zoo bench transfer --quick",
        "quick": True,
        "methods": ["moco"],
        "seeds": [0],
        "transfer_settings": tcfg.to_dict(),
        "recipes": {"moco": {"path": "scan_zoo/recipes/digits_moco.yaml"}},
        "total_seconds": 1.0,
        "runs": [
            {
                "method": "moco",
                "seed": 0,
                "run_dir": "/gone/seed0/moco",
                "steps": 3,
                "trained_now": True,
                "scores": {key: 50.0 for key, _, _ in T.TASKS},
            }
        ],
    }
    base = tmp_path / "old.json"
    base.write_text(json.dumps(old))
    argv = [
        "bench",
        "transfer",
        "--methods",
        "dsc",
        "--seeds",
        "0",
        "--quick",
        "--out",
        str(tmp_path / "b"),
        "--data-cache",
        str(digits_root),
        "--num-workers",
        "0",
        "--merge",
        str(base),
    ]
    for bad, needle in ((["--seeds", "1"], "seeds"), (["--methods", "moco"], "nothing to keep")):
        args = _bench_parser().parse_args(argv + bad)
        with pytest.raises(UserError, match=needle):
            args.func(args)
    assert not (tmp_path / "b").exists()  # refused before training anything
    args = _bench_parser().parse_args(argv)
    assert args.func(args) == 0
    assert "DSC" in capsys.readouterr().out
    result = json.loads((tmp_path / "b" / "results.json").read_text())
    assert result["methods"] == ["moco", "dsc"] and [r["method"] for r in result["runs"]] == ["moco", "dsc"]
    assert result["runs"][0] == old["runs"][0]  # kept exactly as recorded
    assert result["runs"][1]["trained_now"] and result["runs"][1]["steps"] == R.QUICK_STEPS
    assert result["summary"]["semantic_top1"]["moco"]["mean"] == 50.0 and "dsc" in result["summary"]["box_iou"]
    assert result["merged_from"]["path"] == str(base) and set(result["recipes"]) == {"moco", "dsc"}
    text = P.readme_results_section(result)
    assert "| Task | Metric | MoCo-v2 | DSC |" in text.splitlines()
    assert "- On segmentation, DSC (" in text and "MoCo-v2 (50.00)" in text


# ---------------------------------------------------------------------------------------------- README
def _hand_results(scan_semantic: float) -> dict:
    """A results.json with 2 seeds where SCAN wins segmentation and, unless told, loses everything else."""
    base = {
        "supervised": [97.0, 96.0, 60.0, 80.0],
        "moco": [90.0, 70.0, 70.0, 85.0],
        "scan": [scan_semantic, 65.0, 68.0, 90.0],
    }
    runs = []
    for m, vals in base.items():
        for seed, delta in ((0, -0.5), (1, 0.5)):
            runs.append(
                {"method": m, "seed": seed, "scores": {key: v + delta for (key, _, _), v in zip(T.TASKS, vals)}}
            )
    return {
        "methods": ["supervised", "moco", "scan"],
        "seeds": [0, 1],
        "runs": runs,
        "quick": False,
        "command": "scan-zoo bench transfer",
        "recipes": {},
    }


def test_readme_section_says_when_scan_does_not_beat_the_baselines():
    text = P.readme_results_section(_hand_results(95.0))
    assert "| semantic | top-1 (%) | **97.00 ± 0.71** | 90.00 ± 0.71 | 95.00 ± 0.71 |" in text
    assert "On semantic, SCAN (95.00) does not beat both MoCo-v2 and FSup: FSup scores 97.00 (MoCo-v2 90.00)." in text
    assert "On appearance, SCAN (65.00) does not beat" in text
    assert "On segmentation, SCAN (90.00) beats MoCo-v2 and FSup" in text
    assert "- segmentation: **SCAN**" in text and "- semantic: **FSup**" in text
    assert "does not beat" not in [ln for ln in text.splitlines() if ln.startswith("- On segmentation")][0]
    # a winner by less than a standard deviation is flagged
    close = P.readme_results_section(_hand_results(96.8))
    assert "- semantic: **FSup** (97.00 ± 0.71), ahead of SCAN by 0.20 (within one standard deviation" in close


def test_readme_section_flags_dsc_vs_moco_differences_within_the_spread():
    res = _hand_results(95.0)
    # DSC vs MoCo (90, 70, 70, 85) with std 0.71: clearly above, clearly below, 0.5 above, 0.5 below
    for seed, delta in ((0, -0.5), (1, 0.5)):
        res["runs"].append(
            {
                "method": "dsc",
                "seed": seed,
                "scores": {key: v + delta for (key, _, _), v in zip(T.TASKS, [93.0, 60.0, 70.5, 84.5])},
            }
        )
    res["methods"].append("dsc")
    lines = {ln.split(",")[0]: ln for ln in P.readme_results_section(res).splitlines() if "DSC (" in ln}
    assert lines["- On semantic"] == "- On semantic, DSC (93.00) beats MoCo-v2 (90.00)."
    assert lines["- On appearance"] == "- On appearance, DSC (60.00) does not beat MoCo-v2 (70.00)."
    assert lines["- On localisation"].endswith(
        "beats MoCo-v2 (70.00) (within one standard deviation: not a clear difference)."
    )
    assert lines["- On segmentation"].endswith(
        "does not beat MoCo-v2 (85.00) (within one standard deviation: not a clear difference)."
    )


def test_readme_section_with_k_ablation_and_charts_draw(tmp_path):
    ka = {
        "seed": 0,
        "quick": False,
        "budget": {"steps": 685, "images_per_step": 126},
        "moco": {"scores": {key: 50.0 for key, _, _ in T.TASKS}},
        "runs": [
            {"k": k, "scores": {key: 50.0 + i + j for j, (key, _, _) in enumerate(T.TASKS)}}
            for i, k in enumerate(["0", "2", "all"])
        ],
    }
    ka["best_k"] = {key: "all" for key, _, _ in T.TASKS}
    text = P.readme_results_section(_hand_results(95.0), ka)
    assert "### SCAN's K ablation" in text and "| all | **52.00** |" in text and "| MoCo (start) |" in text
    tr = _hand_results(95.0)
    summary = R.summarise(tr["runs"], tr["methods"])
    assert summary["semantic_top1"]["scan"]["std"] == pytest.approx(math.sqrt(0.5))
    for img in (C.transfer_chart(summary, tr["methods"], "t"), C.k_ablation_chart(ka)):
        img.save(tmp_path / "c.png")
        assert (tmp_path / "c.png").stat().st_size > 1000
