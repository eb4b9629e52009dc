"""Crashes: runs killed with SIGKILL (mid-epoch, or while writing a checkpoint) resume to bit-identical
weights; damaged or half-written checkpoints are never picked; a non-finite loss stops the run at once
(or is skipped with --skip-nonfinite) and never reaches a checkpoint.

The kills are real: train.py runs as a subprocess on a tiny ImageFolder and gets SIGKILL at a moment
chosen through a training callback (tests/pause_train.py: the run stops at a named event and waits).
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, ROOT, assert_same_run, cfg_for, make_image_folder, metric_rows, paused, run_cli, sigkill
from safetensors.torch import load_file

from scan_zoo.data.datasets import NeighborBatchSampler
from scan_zoo.experiments.pipeline import run_training
from scan_zoo.methods.contrast import MomentumContrast
from scan_zoo.train.checkpoints import list_checkpoints
from scan_zoo.train.trainer import NonFiniteLoss

# 48 images, 8 a step: 6 steps an epoch, 18 in all; checkpoints at steps 4, 6, 8, 12, 16 and 18, two kept
ARGS = [
    "--method",
    "moco",
    "--model",
    "test_resnet",
    "--image-size",
    "16",
    "--eval-resize",
    "16",
    "--num-workers",
    "0",
    "--batch-size",
    "8",
    "--queue-size",
    "16",
    "--epochs",
    "3",
    "--lr",
    "0.05",
    "--seed",
    "1",
    "--save-every-steps",
    "4",
    "--keep-checkpoints",
    "2",
    "--log-every-steps",
    "1",
    "--deterministic",
    "true",
]
ENV = {"OMP_NUM_THREADS": "1"}  # the same thread count in every run: bit-identical arithmetic


def train_cmd(data, run_dir, *extra):
    return [PYTHON, "train.py", "--data", str(data), "--output-dir", str(run_dir), *ARGS, *extra]


def train(data, run_dir, *extra):
    p = run_cli(train_cmd(data, run_dir, *extra), env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def kill_when_paused(cmd, run_dir: Path, pause: str) -> str:
    """Run ``cmd`` until it waits at ``pause`` (``point:step``), then SIGKILL it; returns its output."""
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / f".paused_{pause.replace(':', '_')}.0"
    log = run_dir.parent / f"{run_dir.name}.killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            paused(cmd, pause),
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **ENV},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 240
            while not marker.exists():
                assert proc.poll() is None, f"the run ended before {pause}:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"the run never reached {pause}"
                time.sleep(0.02)
            assert int(marker.read_text()) == proc.pid
            sigkill(proc, [marker])
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return log.read_text()


def steps_of(run_dir: Path) -> list[str]:
    return [c.name for c in list_checkpoints(run_dir)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("crash") / "data")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run every killed run must end up identical to."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(data, run)
    assert steps_of(run) == ["step_00000016", "step_00000018"]
    return run


# ------------------------------------------------------------------------------------------ SIGKILL
def test_killed_mid_epoch_then_resumed_is_bit_identical(data, reference, tmp_path):
    run = tmp_path / "run"
    kill_when_paused(train_cmd(data, run), run, "step:10")  # epoch 1, 4 of its 6 steps done
    assert steps_of(run) == ["step_00000006", "step_00000008"]
    assert not (run / "model.safetensors").exists()
    assert [r["step"] for r in metric_rows(run)] == list(range(1, 11))
    with open(run / "metrics.jsonl", "a") as f:  # as if the kill had cut a line short
        f.write('{"step": 11, "loss": 2.7')
    p = train(data, run, "--resume", "latest")
    assert "resumed from" in p.stderr and "step_00000008" in p.stderr
    assert_same_run(run, reference)


@pytest.mark.parametrize(
    "point, complete_after_kill",
    [
        ("checkpoint_written", ["step_00000004", "step_00000006"]),  # model and optimizer saved, no train_state.json
        ("checkpoint_complete", ["step_00000004", "step_00000006"]),  # train_state.json written, not renamed yet
        ("checkpoint_renamed", ["step_00000004", "step_00000006", "step_00000008"]),  # renamed, old ones not pruned
    ],
)
def test_killed_while_writing_a_checkpoint_then_resumed_is_bit_identical(
    data, reference, tmp_path, point, complete_after_kill
):
    run = tmp_path / "run"
    kill_when_paused(train_cmd(data, run), run, f"{point}:8")
    assert steps_of(run) == complete_after_kill  # the half-written one is never listed
    tmp = run / "checkpoints" / ".tmp_step_00000008"
    assert tmp.is_dir() == (point != "checkpoint_renamed")
    train(data, run, "--resume", "latest")
    assert steps_of(run) == ["step_00000016", "step_00000018"]
    assert_same_run(run, reference)


def test_damaged_and_leftover_checkpoints_are_never_picked(data, reference, tmp_path):
    """A checkpoint cut short (a power cut before the data reached the disk), an unfinished one that claims a
    later step, a half-deleted one: resume takes the newest complete checkpoint and removes the debris."""
    run = tmp_path / "run"
    train(data, run, "--stop-after-steps", "8")
    ckpts = run / "checkpoints"
    assert steps_of(run) == ["step_00000006", "step_00000008"]
    weights = ckpts / "step_00000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    unfinished = ckpts / ".tmp_step_00000099"
    shutil.copytree(ckpts / "step_00000006", unfinished)
    state = json.loads((unfinished / "train_state.json").read_text())
    (unfinished / "train_state.json").write_text(json.dumps({**state, "step": 99}))
    half_pruned = ckpts / ".trash_step_00000002"
    half_pruned.mkdir()
    (half_pruned / "optimizer.bin").write_bytes(b"\0" * 10)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')
    assert steps_of(run) == ["step_00000006"]

    p = run_cli(train_cmd(data, run, "--resume", str(ckpts / "step_00000008")), env=ENV)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "not a complete checkpoint directory" in p.stderr and "model.safetensors has 1000 bytes" in p.stderr

    p = train(data, run, "--resume", "latest")
    assert "ignoring incomplete checkpoint" in p.stderr and "step_00000006" in p.stderr
    assert not unfinished.exists() and not half_pruned.exists()
    assert_same_run(run, reference)


def test_resumed_from_an_earlier_checkpoint_every_step_and_skipped_image_is_logged_once(tmp_path):
    """Steps run again after a resume replace their log lines (metrics.jsonl, skipped_images.txt), and the
    checkpoint of a step written again replaces the old one. (In-process runs: no kill needed here.)"""
    data = make_image_folder(tmp_path / "data")
    sampler = NeighborBatchSampler(48, 8, seed=1)

    def steps_reading(image):  # the steps (numbered from 1) whose batch holds ``image``
        found = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            found += [epoch * 6 + s + 1 for s in range(6) if image in [i for i, _, _ in sampler.batch(s)]]
        return found

    image = next(i for i in range(48) if any(4 < t <= 8 for t in steps_reading(i)))  # read again after the resume
    broken = data / "train" / f"class_{image // 16}" / f"{image % 16:03d}.png"
    broken.write_bytes(b"not a png any more")
    want = [f"step {t}" for t in steps_reading(image)]
    kw = dict(epochs=3, save_every_steps=4, keep_checkpoints=3)
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_training(cfg_for(data, ref, **kw))
    run_training(cfg_for(data, run, stop_after_steps=8, **kw))
    run_training(cfg_for(data, run, resume=str(run / "checkpoints" / "step_00000004"), **kw))
    lines = {r: (r / "skipped_images.txt").read_text().splitlines() for r in (ref, run)}
    assert lines[run] == lines[ref]  # not doubled by the steps run twice
    assert [ln.split("\t")[0] for ln in lines[ref]] == want and all(str(broken) in ln for ln in lines[ref])
    assert_same_run(run, ref)


# ---------------------------------------------------------------------------------- non-finite loss
@pytest.fixture
def nan_at(monkeypatch):
    """``nan_at(steps, poison=())``: at those steps (numbered from 1, as in metrics.jsonl, and across resumes)
    the loss becomes NaN as if the batch had produced it; at the ``poison`` steps a BatchNorm statistic of the
    key encoder becomes NaN (as an overflow would make it; the loss stays finite). The forward pass keeps its
    side effects. A second call replaces the first."""
    forward = MomentumContrast.forward

    def install(steps, poison=()):
        def patched(self, batch):
            out = forward(self, batch)
            if self.training and int(self.steps) in steps:
                out = {**out, "loss": out["loss"] * float("nan")}
            if self.training and int(self.steps) in poison:
                with torch.no_grad():
                    self.encoder_k.backbone.conv1[1].running_mean[0] = float("nan")
            return out

        monkeypatch.setattr(MomentumContrast, "forward", patched)

    return install


def test_nonfinite_loss_stops_at_once_naming_the_step_and_the_loss_terms(tiny_data, tmp_path, nan_at):
    nan_at({5})
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss) as e:
        run_training(cfg_for(tiny_data, run, save_every_steps=2))
    msg = str(e.value)
    assert "step 5 " in msg and "loss=nan" in msg and "positives=" in msg, msg
    assert str(run / "checkpoints" / "step_00000004") in msg and "--skip-nonfinite" in msg
    assert "\n" not in msg  # train.py prints it as one line
    assert steps_of(run) == ["step_00000002", "step_00000004"]
    assert not [p for p in (run / "checkpoints").iterdir() if not p.name.startswith("step_")]
    assert not (run / "model.safetensors").exists()
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3, 4]
    # the last good checkpoint is exactly what a run stopped there writes
    clean = tmp_path / "clean"
    run_training(cfg_for(tiny_data, clean, save_every_steps=2, stop_after_steps=4))
    for name in ("model.safetensors", "optimizer.bin"):
        a = (run / "checkpoints" / "step_00000004" / name).read_bytes()
        assert a == (clean / "checkpoints" / "step_00000004" / name).read_bytes(), name


def test_skip_nonfinite_skips_logs_and_leaves_the_method_consistent(tiny_data, tmp_path, nan_at, caplog):
    nan_at({3, 7})
    run = tmp_path / "run"
    r = run_training(cfg_for(tiny_data, run, skip_nonfinite=2, save_every_steps=1, keep_checkpoints=20))
    assert r["finished"] and r["steps"] == 12
    assert "skipped step 3 (1 of at most 2" in caplog.text and "skipped step 7 (2 of at most 2" in caplog.text
    rows = metric_rows(run)
    assert [row["step"] for row in rows] == list(range(1, 13))  # every step once, skipped ones included
    skipped = {row["step"]: row for row in rows if "skipped_nonfinite" in row}
    assert sorted(skipped) == [3, 7] and skipped[7]["skipped_nonfinite"] == 2
    assert skipped[3]["terms"]["loss"] == "nan" and "positives" in skipped[3]["terms"]
    ck = {s: load_file(str(run / "checkpoints" / f"step_{s:08d}" / "model.safetensors")) for s in (2, 3)}
    # no optimiser step: the query encoder and SGD's momentum are as they were ...
    q = [k for k in ck[2] if k.startswith("encoder_q.") and "running" not in k and "num_batches" not in k]
    assert q and all(torch.equal(ck[2][k], ck[3][k]) for k in q)
    opt = [torch.load(run / "checkpoints" / f"step_{s:08d}" / "optimizer.bin", weights_only=True) for s in (2, 3)]
    assert all(
        torch.equal(a["momentum_buffer"], b["momentum_buffer"])
        for a, b in zip(opt[0]["state"].values(), opt[1]["state"].values())
    )
    # ... while the forward pass's momentum update and enqueued keys are kept, and the counters move on
    assert any(not torch.equal(ck[2][k], ck[3][k]) for k in ck[2] if k.startswith("encoder_k."))
    assert int(ck[3]["queue.ptr"]) == 3 * 8 % 16 and int(ck[3]["steps"]) == 3
    state = json.loads((run / "checkpoints" / "step_00000012" / "train_state.json").read_text())
    assert state["skipped_nonfinite"] == 2 and state["scheduler"]["last_epoch"] == 12


def test_more_nonfinite_steps_than_allowed_stop_the_run_also_across_a_resume(tiny_data, tmp_path, nan_at):
    nan_at({3, 6})
    run = tmp_path / "run"
    run_training(cfg_for(tiny_data, run, skip_nonfinite=1, stop_after_steps=4))
    state = json.loads((run / "checkpoints" / "step_00000004" / "train_state.json").read_text())
    assert state["skipped_nonfinite"] == 1
    with pytest.raises(NonFiniteLoss, match=r"step 6 .*1 non-finite step\(s\) skipped already.*--skip-nonfinite 1"):
        run_training(cfg_for(tiny_data, run, skip_nonfinite=1, resume="latest"))
    assert steps_of(run) == ["step_00000004"]


def test_a_nonfinite_model_state_is_never_checkpointed_nor_skipped(tiny_data, tmp_path, nan_at):
    nan_at(set(), poison={3})  # finite losses, but a BatchNorm statistic is NaN from step 3 on
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=r"not finite after step 4 \(encoder_k\.backbone\.conv1\.1\.running_mean"):
        run_training(cfg_for(tiny_data, run, save_every_steps=2))
    assert steps_of(run) == ["step_00000002"]
    assert not [p for p in (run / "checkpoints").iterdir() if not p.name.startswith("step_")]

    nan_at({3}, poison={3})  # a non-finite loss that left the state non-finite too: skipping cannot help
    with pytest.raises(NonFiniteLoss, match=r"step 3 .*model state is not finite either \(encoder_k"):
        run_training(cfg_for(tiny_data, tmp_path / "run2", skip_nonfinite=5, save_every_steps=2))
