"""benchmarks/gpu_check.py at toy size on the CPU (what CI can run): every section measured or skipped with a
reason, the resume through train.py bit-identical, and the report says what it skipped."""

import json
import math

import pytest
from helpers import PYTHON, run_cli

SECTIONS = {"throughput", "throughput_compile", "decode_cpu", "decode_device", "train_resume", "features", "mining"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "toy.json"
    r = run_cli([PYTHON, "benchmarks/gpu_check.py", "--toy", "--out", str(out)], timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(out.read_text()), r.stdout


@pytest.mark.slow
def test_every_section_is_measured_or_skipped_with_a_reason(toy):
    res, _ = toy
    sec = res["sections"]
    assert set(sec) == SECTIONS
    for name, s in sec.items():
        assert s["status"] in ("measured", "skipped"), (name, s)
        if s["status"] == "skipped":
            assert s["reason"].strip(), name
    assert res["machine"]["toy"] and res["machine"]["why_toy"] == "--toy"
    # on the CPU the GPU-only parts are skipped, the rest runs
    assert sec["throughput_compile"]["status"] == "skipped" and sec["decode_device"]["status"] == "skipped"
    for name in SECTIONS - {"throughput_compile", "decode_device"}:
        assert sec[name]["status"] == "measured", name
    assert res["skipped"] == {k: v["reason"] for k, v in sec.items() if v["status"] == "skipped"}


@pytest.mark.slow
def test_figures_are_positive_and_the_toy_makes_no_target_claim(toy):
    sec = toy[0]["sections"]
    t = sec["throughput"]
    assert set(t["images_per_s"]) == {"scan", "moco", "supervised"}
    assert all(v > 0 for v in t["images_per_s"].values())
    assert math.isclose(
        t["ratio_scan_supervised"], t["images_per_s"]["scan"] / t["images_per_s"]["supervised"], rel_tol=1e-2
    )
    assert t["met"] is None and not t["bf16"] and not t["channels_last"]
    assert sec["decode_cpu"]["loader_images_per_s"] > 0 and sec["features"]["images_per_s"] > 0
    assert sec["mining"]["mine_neighbors_s"] >= 0


@pytest.mark.slow
def test_resume_through_train_py_is_bit_identical(toy):
    r = toy[0]["sections"]["train_resume"]
    assert r["passed"] and r["finite_losses"] and r["bit_identical"] and r["max_abs_diff"] == 0
    assert r["losses_logged"] == r["steps"] and r["stopped_at"] < r["steps"]


@pytest.mark.slow
def test_report_prints_the_table_and_what_was_skipped(toy):
    res, stdout = toy
    table = [ln for ln in stdout.splitlines() if ln.startswith("| ")]
    assert table[0] == "| check | result | note |" and len(table) == 1 + len(SECTIONS)
    after = stdout.split("not measured:", 1)[1]
    for name, reason in res["skipped"].items():
        assert f"{name}: skipped: {reason}" in after


def test_help():
    r = run_cli([PYTHON, "benchmarks/gpu_check.py", "--help"], timeout=120)
    assert r.returncode == 0 and "--toy" in r.stdout
