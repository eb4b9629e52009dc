"""Resume that cannot lie: a checkpoint is continued only by the run that wrote it (or with an explicit
--resume-override, recorded); a resume from further back moves the newer checkpoints aside; a corrupt
checkpoint is refused; one run per directory; an --output-dir that is a file and a full disk are one line.

The runs are real ``train.py`` processes on a tiny ImageFolder; one short run is trained once and copied.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import yaml
from helpers import PYTHON, ROOT, make_image_folder, paused, run_cli

from scan_zoo.train.checkpoints import checkpoint_problem, list_checkpoints
from scan_zoo.train.trainer import cosine_lr

# 48 images, 8 a step: 6 steps an epoch; checkpoints at steps 2 and 4
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
    "--lr",
    "0.05",
    "--seed",
    "1",
    "--save-every-steps",
    "2",
    "--keep-checkpoints",
    "3",
    "--log-every-steps",
    "1",
]
ENV = {"OMP_NUM_THREADS": "1"}


def train(data, run_dir, *extra, env=None):
    return run_cli(
        [PYTHON, "train.py", "--data", str(data), "--output-dir", str(run_dir), *ARGS, *extra],
        env={**ENV, **(env or {})},
    )


def error_line(p) -> str:
    """The run failed with exit 2 and exactly one non-empty stderr line, which is returned."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("train.py: error: ")
    return lines[0]


def snapshot(run_dir):
    """Every file of a run directory with its bytes (to show a refused resume wrote nothing)."""
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_image_folder(root / "data")
    p = train(data, root / "run", "--max-steps", "4")
    assert p.returncode == 0, p.stderr[-3000:]
    assert [c.name for c in list_checkpoints(root / "run")] == ["step_00000002", "step_00000004"]
    return data, root / "run"


@pytest.fixture
def run(base_run, tmp_path):
    data, src = base_run
    shutil.copytree(src, tmp_path / "run")
    return data, tmp_path / "run"


def test_changed_lr_is_refused_then_applied_and_recorded_with_an_override(run):
    data, run_dir = run
    before = snapshot(run_dir)
    msg = error_line(train(data, run_dir, "--resume", "latest", "--lr", "0.02", "--max-steps", "6"))
    assert "max_steps 4 -> 6" in msg and "lr 0.05 -> 0.02" in msg and "--resume-override lr,max_steps" in msg
    assert snapshot(run_dir) == before  # nothing written, nothing lost

    p = train(
        data, run_dir, "--resume", "latest", "--lr", "0.02", "--max-steps", "6", "--resume-override", "lr,max_steps"
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    override = [r for r in rows if "resume_override" in r]
    assert len(override) == 1 and override[0]["step"] == 4
    assert override[0]["resume_override"] == {"max_steps": {"old": 4, "new": 6}, "lr": {"old": 0.05, "new": 0.02}}
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    for step in (5, 6):  # the schedule rebuilt from the new peak lr and length (lr logged after the step)
        assert lrs[step] == pytest.approx(0.02 * cosine_lr(step, 6, 0)), (step, lrs)
    ckpt = list_checkpoints(run_dir)[-1]
    assert ckpt.name == "step_00000006"
    for cfg in (
        yaml.safe_load((run_dir / "config.yaml").read_text()),
        yaml.safe_load((ckpt / "config.yaml").read_text()),
        json.loads((run_dir / "config.json").read_text())["scan_zoo"]["config"],
    ):
        assert cfg["lr"] == 0.02 and cfg["max_steps"] == 6
    # the new values are the run's identity from now on: resuming with them needs no override
    p = train(data, run_dir, "--resume", "latest", "--lr", "0.02", "--max-steps", "6", "--num-workers", "1")
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.parametrize(
    "change", [["--method", "supcon"], ["--queue-size", "32"], ["--proj-dim", "64", "--resume-override", "proj_dim"]]
)
def test_another_kind_of_run_is_refused_even_with_an_override(run, change):
    data, run_dir = run
    before = snapshot(run_dir)
    msg = error_line(train(data, run_dir, "--resume", "latest", "--max-steps", "4", *change))
    field = change[0][2:].replace("-", "_")
    assert f"{field} " in msg and "no --resume-override can change that" in msg
    assert snapshot(run_dir) == before


def test_changed_training_data_is_refused(run, tmp_path):
    data, run_dir = run
    other = tmp_path / "data2"
    shutil.copytree(data, other)  # another path is fine, other content is not
    victim = other / "train" / "class_1" / "003.png"
    victim.write_bytes(victim.read_bytes() + b"\0" * 7)
    msg = error_line(train(other, run_dir, "--resume", "latest", "--max-steps", "4"))
    assert "data (other file names, labels or sizes)" in msg and "--resume-override data" in msg
    victim.write_bytes(victim.read_bytes()[:-7])
    p = train(other, run_dir, "--resume", "latest", "--max-steps", "4")
    assert p.returncode == 0, p.stderr[-3000:]


def test_resume_from_further_back_moves_the_newer_checkpoints_aside(run):
    data, run_dir = run
    newer = run_dir / "checkpoints" / "step_00000004"
    newer_files = snapshot(newer)
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is gone: its lock file is stale
    (run_dir / "run.lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    p = train(
        data,
        run_dir,
        "--resume",
        str(run_dir / "checkpoints" / "step_00000002"),
        "--max-steps",
        "4",
        "--stop-after-steps",
        "3",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "taking over the stale lock" in p.stderr and str(dead.pid) in p.stderr
    assert "abandoned_checkpoints" in p.stderr
    assert [c.name for c in list_checkpoints(run_dir)] == ["step_00000002", "step_00000003"]  # latest: this line
    (moved,) = (run_dir / "abandoned_checkpoints").iterdir()
    assert snapshot(moved / "step_00000004") == newer_files  # kept whole


def test_corrupt_checkpoint_is_refused_never_replaced_by_an_older_one(run):
    data, run_dir = run
    weights = run_dir / "checkpoints" / "step_00000004" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0xFF  # same size: only the recorded hash can tell
    weights.write_bytes(bytes(raw))
    before = snapshot(run_dir)
    msg = error_line(train(data, run_dir, "--resume", "latest", "--max-steps", "4"))
    assert "step_00000004 is corrupt" in msg and "model.safetensors" in msg and "step_00000002" in msg
    assert snapshot(run_dir) == before
    msg = error_line(train(data, run_dir, "--resume", str(weights.parent), "--max-steps", "4"))
    assert "is corrupt" in msg


def test_a_second_run_in_the_same_directory_fails_at_once(base_run, tmp_path):
    data, _ = base_run
    run_dir = tmp_path / "run"
    marker = run_dir / ".paused_step_1.0"
    cmd = [PYTHON, "train.py", "--data", str(data), "--output-dir", str(run_dir), *ARGS, "--max-steps", "2"]
    first = subprocess.Popen(
        paused(cmd, "step:1"),
        cwd=ROOT,
        env={**os.environ, **ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never reached step 1"
            time.sleep(0.05)
        metrics = (run_dir / "metrics.jsonl").read_bytes()
        msg = error_line(train(data, run_dir, "--max-steps", "2"))
        assert f"pid {first.pid} on {socket.gethostname()}" in msg and "in use by another run" in msg
        assert (run_dir / "metrics.jsonl").read_bytes() == metrics
        marker.unlink()
        assert first.wait(timeout=240) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert [c.name for c in list_checkpoints(run_dir)] == ["step_00000002"]


def test_output_dir_that_is_a_file_is_one_line(base_run, tmp_path):
    data, _ = base_run
    f = tmp_path / "notadir"
    f.write_text("keep me")
    msg = error_line(train(data, f, "--max-steps", "2"))
    assert "is a file" in msg
    assert f.read_text() == "keep me"


def test_full_disk_while_checkpointing_is_one_line_and_the_last_checkpoint_survives(
    base_run, tmp_path, capsys, monkeypatch
):
    """In-process (a full disk cannot be made here): the second checkpoint's write fails with ENOSPC."""
    from accelerate import Accelerator

    import train as train_script

    data, _ = base_run
    run_dir = tmp_path / "run"
    real_save, calls = Accelerator.save_state, []

    def save_state(self, output_dir=None, **kw):
        calls.append(output_dir)
        if len(calls) == 1:
            return real_save(self, output_dir, **kw)
        with open(os.path.join(output_dir, "model.safetensors"), "wb") as f:
            f.write(b"\0" * 100)  # cut short where the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc = train_script.main(["--data", str(data), "--output-dir", str(run_dir), *ARGS, "--max-steps", "4"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "%|" not in ln]
    assert rc == 2, err
    errors = [ln for ln in err if ln.startswith("train.py: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "step_00000004" in errors[0]
    assert "step_00000002" in errors[0] and not any("Traceback" in ln for ln in err)
    assert [c.name for c in list_checkpoints(run_dir)] == ["step_00000002"]
    assert checkpoint_problem(run_dir / "checkpoints" / "step_00000002", verify=True) is None
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("step_")]
