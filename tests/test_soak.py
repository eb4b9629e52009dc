"""Soak: two processes, a few hundred steps, an image broken mid-run, a NaN on one process, a SIGKILL and a
resume. The run must end bit-identical to the same run left alone, with a checkpoint whose queue, step
counters and data position agree with each other and with the data the sampler handed out.

Slow (about 1.5 minutes on two busy CPU cores): ``pytest -m slow tests/test_soak.py``.
"""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import BIN, ROOT, make_image_folder, sigkill
from safetensors.torch import load_file
from torchvision.datasets import ImageFolder

from scan_zoo.data.datasets import NeighborBatchSampler
from scan_zoo.train.checkpoints import list_checkpoints

pytestmark = pytest.mark.slow

N, WORLD, BATCH, QUEUE = 60, 2, 4, 52  # 60 images, 2 processes x 4 images: 8 steps an epoch
EPOCHS, SPE = 40, 8
TOTAL = EPOCHS * SPE  # 320 steps
BREAK_AT = 60  # the image is broken while both processes wait after this step
NAN_AT = 128  # the loss of process 1 is NaN at this step (skipped: --skip-nonfinite 1)
KILL_AT = 130  # SIGKILL, 5 steps after the checkpoint of step 125
SAVE_EVERY = 25  # (and no checkpoint at epoch ends)

# train.py with the loss of process 1 made NaN at the steps in SOAK_NAN_STEPS (numbered from 1, as the
# model's own step counter does, so a resumed run meets them again exactly like an uninterrupted one), paused
# at the events in SOAK_PAUSE (tests/pause_train.py)
WRAPPER = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from scan_zoo.common import distributed as D
from scan_zoo.methods.contrast import MomentumContrast

BAD = {{int(s) for s in os.environ["SOAK_NAN_STEPS"].split(",")}}
forward = MomentumContrast.forward


def patched(self, batch):
    out = forward(self, batch)
    if self.training and D.rank() == 1 and int(self.steps) in BAD:
        out = {{**out, "loss": out["loss"] * float("nan")}}
    return out


MomentumContrast.forward = patched
sys.path.insert(0, {str(ROOT / "tests")!r})
import pause_train

pause = os.environ.get("SOAK_PAUSE")
sys.exit(pause_train.main(["--pause", pause, *sys.argv[1:]] if pause else sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_stream(targets, broken: int):
    """What the sampler hands out: per step, per process, the image indices read (the broken one dropped from
    step BREAK_AT + 1 on); returns (keys' labels in queue order, {rank: ["step T", ...] skip lines})."""
    labels, skips = [], {0: [], 1: []}
    samplers = [NeighborBatchSampler(N, BATCH, rank=r, world_size=WORLD, seed=3) for r in range(WORLD)]
    for t in range(1, TOTAL + 1):
        epoch, s = divmod(t - 1, SPE)
        if s == 0:
            for sampler in samplers:
                sampler.set_epoch(epoch)
            perm = samplers[0].permutation()  # the same on every process
        for r, sampler in enumerate(samplers):
            for i, _, _ in sampler.batch(s, perm):
                if i == broken and t > BREAK_AT:
                    skips[r].append(f"step {t}")
                else:
                    labels.append(targets[i])
    return labels, skips


def pick_broken(targets) -> int:
    """An image read between the checkpoint before the kill and the kill: its skip line must not be doubled."""
    for i in range(N):
        _, skips = expected_stream(targets, i)
        steps = [int(ln.split()[1]) for r in skips for ln in skips[r]]
        if any(KILL_AT - 5 < t <= KILL_AT for t in steps) and all(t != NAN_AT for t in steps):
            return i
    raise AssertionError("no image fits")


def launch(script: Path, data: Path, run: Path, env: dict, *extra) -> subprocess.Popen:
    cmd = [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(WORLD),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(script),
        "--method",
        "supcon",
        "--model",
        "test_resnet",
        "--data",
        str(data),
        "--output-dir",
        str(run),
        "--image-size",
        "16",
        "--eval-resize",
        "16",
        "--num-workers",
        "0",
        "--batch-size",
        str(BATCH),
        "--queue-size",
        str(QUEUE),
        "--epochs",
        str(EPOCHS),
        "--lr",
        "0.05",
        "--seed",
        "3",
        "--save-every-steps",
        str(SAVE_EVERY),
        "--save-every-epochs",
        "100",
        "--keep-checkpoints",
        "2",
        "--log-every-steps",
        "1",
        "--skip-nonfinite",
        "1",
        "--deterministic",
        "true",
        *extra,
    ]
    with open(run.parent / f"{run.name}.log", "a") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "SOAK_NAN_STEPS": str(NAN_AT), **env},
        )
    LAUNCHED.append(proc)
    return proc


LAUNCHED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_stray_launchers():
    """A failing test leaves no launcher behind (the workers end with their run, or in 5 minutes if paused)."""
    yield
    for proc in LAUNCHED:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    LAUNCHED.clear()


def wait_paused(proc, run: Path, step: int) -> list[Path]:
    markers = [run / f".paused_step_{step}.{r}" for r in range(WORLD)]
    deadline = time.monotonic() + 300
    while not all(m.exists() for m in markers):
        assert proc.poll() is None, (run.parent / f"{run.name}.log").read_text()[-4000:]
        assert time.monotonic() < deadline, f"never paused at step {step}"
        time.sleep(0.05)
    return markers


def finish(proc, run: Path) -> None:
    assert proc.wait(timeout=600) == 0, (run.parent / f"{run.name}.log").read_text()[-4000:]


def test_soak_two_processes_broken_image_nan_and_sigkill(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=20, val_per_class=2)
    script = tmp_path / "train_with_nan.py"
    script.write_text(WRAPPER)
    train_set = ImageFolder(str(data / "train"))
    targets = train_set.targets
    broken = pick_broken(targets)
    broken_path = Path(train_set.samples[broken][0])
    good_bytes = broken_path.read_bytes()

    def run_until_break(run: Path, pause: str):
        proc = launch(script, data, run, {"SOAK_PAUSE": pause})
        markers = wait_paused(proc, run, BREAK_AT)
        broken_path.write_bytes(good_bytes[: len(good_bytes) // 3])  # truncated, as a half-synced file is
        for m in markers:
            m.unlink()
        return proc

    # the uninterrupted run (the image breaks at the same step)
    ref = tmp_path / "ref"
    proc = run_until_break(ref, f"step:{BREAK_AT}")
    finish(proc, ref)
    broken_path.write_bytes(good_bytes)

    # the same run, killed at step KILL_AT and resumed
    run = tmp_path / "run"
    proc = run_until_break(run, f"step:{BREAK_AT},step:{KILL_AT}")
    sigkill(proc, wait_paused(proc, run, KILL_AT))  # both training processes, and the launcher
    assert [c.name for c in list_checkpoints(run)] == ["step_00000100", "step_00000125"]
    assert not (run / "model.safetensors").exists()
    # the truncated image changed the training data's fingerprint since the run started: resuming says so
    # explicitly (the reference run read the same truncated file from the same step on)
    finish(launch(script, data, run, {}, "--resume", "latest", "--resume-override", "data"), run)

    # bit-identical to the uninterrupted run
    ckpt, ref_ckpt = list_checkpoints(run)[-1], list_checkpoints(ref)[-1]
    assert ckpt.name == ref_ckpt.name == f"step_{TOTAL:08d}"
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl"):
        assert (ckpt / name).read_bytes() == (ref_ckpt / name).read_bytes(), name
    a, b = load_file(str(run / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)

    # step counters and data position agree
    state = json.loads((ckpt / "train_state.json").read_text())
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (TOTAL, EPOCHS, 0)
    assert state["step"] == state["epoch"] * state["steps_per_epoch"] + state["step_in_epoch"]
    assert state["scheduler"]["last_epoch"] == TOTAL and state["skipped_nonfinite"] == 1
    model = load_file(str(ckpt / "model.safetensors"))
    assert int(model["steps"]) == TOTAL

    # the queue holds the keys of exactly the images handed out, broken one excluded, skipped step included
    labels, skips = expected_stream(targets, broken)
    assert int(model["queue.ptr"]) == len(labels) % QUEUE
    ptr = int(model["queue.ptr"])
    in_order = torch.cat([model["queue.labels"][ptr:], model["queue.labels"][:ptr]])  # oldest first
    assert in_order.tolist() == labels[-QUEUE:]
    keys = model["queue.keys"]
    assert torch.isfinite(keys).all() and torch.allclose(keys.norm(dim=1), torch.ones(QUEUE), atol=1e-5)

    # every step logged once (the NaN step as a skip naming both processes' terms); each skip of the image once
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    overrides = [r for r in rows if "resume_override" in r]  # the resume's record of the data change
    assert [(r["step"], list(r["resume_override"])) for r in overrides] == [
        (KILL_AT // SAVE_EVERY * SAVE_EVERY, ["data"])
    ], overrides
    rows = [r for r in rows if "resume_override" not in r]
    assert [r["step"] for r in rows] == list(range(1, TOTAL + 1))
    nan_row = rows[NAN_AT - 1]
    assert nan_row["skipped_nonfinite"] == 1 and nan_row["terms"][1]["loss"] == "nan"
    assert isinstance(nan_row["terms"][0]["loss"], float)
    for r in range(WORLD):
        path = run / f"skipped_images.rank{r}.txt"
        lines = path.read_text().splitlines() if path.exists() else []
        assert [ln.split("\t")[0] for ln in lines] == skips[r]
        assert all(str(broken_path) in ln for ln in lines)
    assert EPOCHS - BREAK_AT // SPE - 1 <= sum(len(v) for v in skips.values()) <= EPOCHS - BREAK_AT // SPE
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000300", f"step_{TOTAL:08d}"]
