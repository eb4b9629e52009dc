"""Ctrl-C (SIGINT) ends a run in one line with exit status 130 and a checkpoint to continue from; a batch in
which no image can be read is a skipped step, not a crash.

Ctrl-C is sent as a terminal sends it: to the whole process group (DataLoader workers included). The moment is
chosen through a training callback (tests/pause_train.py: the run waits after a step until released).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import PYTHON, ROOT, launch_cmd, make_image_folder, paused

from scan_zoo.data.datasets import NeighborBatchSampler, image_folder
from scan_zoo.experiments.pipeline import run_training
from scan_zoo.train.checkpoints import checkpoint_problem
from scan_zoo.train.config import build_config

ARGS = [
    "--method",
    "moco",
    "--model",
    "test_resnet",
    "--image-size",
    "16",
    "--eval-resize",
    "16",
    "--batch-size",
    "8",
    "--queue-size",
    "16",
    "--epochs",
    "1000",
    "--log-every-steps",
    "1",
    "--seed",
    "1",
]
LINE = re.compile(
    r"^train\.py: interrupted at step (\d+); the last checkpoint is (\S+); continue with --resume latest$"
)


def start(cmd, run_dir, pause=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # a session of its own: os.killpg reaches it and its DataLoader workers, as Ctrl-C in a terminal would
    return subprocess.Popen(
        paused(cmd, pause),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def train_cmd(data, run_dir, *extra):
    return [PYTHON, "train.py", "--data", str(data), "--output-dir", str(run_dir), *ARGS, *extra]


def wait_for(paths, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not all(p.is_file() for p in paths):
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before pausing:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "never paused"
        time.sleep(0.05)


def ctrl_c(proc):
    os.killpg(proc.pid, signal.SIGINT)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def last_line(err: str) -> str:
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return lines[-1]


def interrupted(err: str) -> tuple[int, Path]:
    """The step and checkpoint the one closing line names (it must be the last line, and the only such line)."""
    m = LINE.match(last_line(err))
    assert m, err[-2000:]
    assert err.count("train.py: interrupted") == 1
    return int(m.group(1)), Path(m.group(2))


def test_ctrl_c_saves_a_checkpoint_and_resume_latest_continues(tmp_path):
    data = make_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    p = start(train_cmd(data, run, "--num-workers", "0"), run, pause="step:2")
    marker = run / ".paused_step_2.0"
    wait_for([marker], p)
    ctrl_c(p)
    time.sleep(0.3)
    marker.unlink()  # let it go on: it stops before the next step
    rc, out, err = finish(p)
    assert rc == 130, err[-3000:]
    step, ckpt = interrupted(err)
    assert step == 2 and ckpt == run / "checkpoints" / "step_00000002"
    assert checkpoint_problem(ckpt) is None
    assert not (run / "model.safetensors").exists()  # an unfinished run exports nothing

    # the same command with --resume latest continues from it (here with DataLoader workers), and stops again
    p = start(train_cmd(data, run, "--num-workers", "2", "--resume", "latest"), run, pause="step:3")
    marker = run / ".paused_step_3.0"
    wait_for([marker], p)
    ctrl_c(p)
    time.sleep(0.3)
    marker.unlink()
    rc, out, err = finish(p)
    assert rc == 130, err[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'}" in err
    step, ckpt = interrupted(err)
    assert step == 3 and checkpoint_problem(ckpt) is None
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_ctrl_c_stops_at_once_naming_the_previous_checkpoint(tmp_path, second):
    """SIGTERM after Ctrl-C is what a one-process ``accelerate launch`` sends its script (then SIGKILL)."""
    data = make_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    p = start(train_cmd(data, run, "--num-workers", "2", "--save-every-steps", "1"), run, pause="step:2")
    wait_for([run / ".paused_step_2.0"], p)  # step 1's checkpoint is written, step 2's is not
    ctrl_c(p)
    time.sleep(0.5)  # two signals before the handler ran would count as one
    os.killpg(p.pid, second)
    rc, out, err = finish(p)
    assert rc == 130, err[-3000:]
    step, ckpt = interrupted(err)
    assert step == 2 and ckpt == run / "checkpoints" / "step_00000001"
    assert checkpoint_problem(ckpt) is None
    assert sorted(d.name for d in (run / "checkpoints").iterdir() if not d.name.startswith(".")) == ["step_00000001"]


def test_stop_request_flags_the_first_sigint_and_aborts_on_the_second():
    from scan_zoo.train.interrupt import Interrupted, StopRequest

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopRequest(lambda: Interrupted(7, "ckpt"), notice=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs in the main thread, between two bytecodes
        assert stop.requested
        with pytest.raises(
            Interrupted, match="^interrupted at step 7; the last checkpoint is ckpt; continue with --resume latest$"
        ):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigterm_alone_still_ends_the_process_at_once():
    code = (
        "import os, signal, time\n"
        "from scan_zoo.train.interrupt import Interrupted, StopRequest\n"
        "with StopRequest(lambda: Interrupted(1, 'x')):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "print('survived')\n"
    )
    p = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGTERM and "survived" not in p.stdout, p.stderr[-2000:]


def test_ctrl_c_while_starting_up_is_one_line(tmp_path):
    data = make_image_folder(tmp_path / "data")
    p = start(train_cmd(data, tmp_path / "run", "--num-workers", "0"), tmp_path / "run")
    time.sleep(1.0)  # importing torch and accelerate takes longer than this
    ctrl_c(p)
    rc, out, err = finish(p)
    assert rc == 130, err[-3000:]
    assert last_line(err) == "train.py: interrupted outside the training steps; continue with --resume latest"


def test_ctrl_c_during_export_is_one_line(tmp_path, monkeypatch, capsys):
    """After the last step (the final checkpoint is written): exporting is interrupted, resume finishes it."""
    sys.path.insert(0, str(ROOT))
    import train
    from scan_zoo.train.trainer import Trainer

    def export(self):
        raise KeyboardInterrupt

    data = make_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    args = ["--data", str(data), "--output-dir", str(run), *ARGS, "--num-workers", "0", "--max-steps", "2"]
    with monkeypatch.context() as m:
        m.setattr(Trainer, "export", export)
        try:
            rc = train.main(args)
        except KeyboardInterrupt:  # escaping, it would end the pytest session too
            pytest.fail("KeyboardInterrupt escaped train.main")
        assert rc == 130
    err = capsys.readouterr().err
    assert last_line(err) == "train.py: interrupted outside the training steps; continue with --resume latest"
    assert checkpoint_problem(run / "checkpoints" / "step_00000002") is None
    assert train.main([*args, "--resume", "latest"]) == 0
    assert (run / "model.safetensors").is_file()


def corrupt_batch(data: Path, step: int, seed: int, anchors: int, rank: int = 0, world_size: int = 1) -> list[str]:
    """Overwrite with junk every training image the sampler puts in ``step``'s batch (epoch 0) on ``rank``."""
    base = image_folder(data, "train")
    sampler = NeighborBatchSampler(len(base), anchors, None, rank=rank, world_size=world_size, seed=seed)
    sampler.set_epoch(0)
    paths = sorted({base.samples[i][0] for i, _, _ in sampler.batch(step)})
    for path in paths:
        Path(path).write_bytes(b"not an image")
    return paths


def test_a_batch_without_one_readable_image_is_a_skipped_step(tmp_path):
    data = make_image_folder(tmp_path / "data")  # 48 images: 6 steps of 8
    bad = corrupt_batch(data, step=1, seed=1, anchors=8)  # the second step's batch
    run = tmp_path / "run"
    cfg = build_config(
        dict(
            method="moco",
            model="test_resnet",
            data=str(data),
            output_dir=str(run),
            epochs=1,
            batch_size=8,
            queue_size=16,
            image_size=16,
            eval_resize=16,
            num_workers=0,
            log_every_steps=1,
            seed=1,
        )
    )
    r = run_training(cfg)
    assert r["finished"] and r["steps"] == 6
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 2, "epoch": 0, "skipped_unreadable": 1, "processes": 1} in rows
    assert [row["step"] for row in rows if "loss" in row] == [1, 3, 4, 5, 6]
    listed = (run / "skipped_images.txt").read_text().splitlines()
    assert len(listed) == len(bad) and all(ln.startswith("step 2\t") for ln in listed)
    assert (run / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_processes_skip_and_stop_at_the_same_step(tmp_path):
    """accelerate launch, 2 CPU processes: rank 0's second batch is unreadable (both skip that step); then Ctrl-C
    to the launcher, which passes it to each process: both stop after step 3, one line, exit status 130."""

    data = make_image_folder(tmp_path / "data")
    corrupt_batch(data, step=1, seed=1, anchors=8, rank=0, world_size=2)
    run = tmp_path / "run"
    cmd = launch_cmd(
        [
            "--data",
            str(data),
            "--output-dir",
            str(run),
            *ARGS,
            "--num-workers",
            "0",
        ]
    )
    p = start(cmd, run, pause="step:3")
    markers = [run / f".paused_step_3.{r}" for r in (0, 1)]
    wait_for(markers, p)
    ctrl_c(p)
    time.sleep(0.5)
    for m in markers:
        m.unlink()
    rc, out, err = finish(p)
    assert rc == 130, err[-3000:]
    step, ckpt = interrupted(err)
    assert step == 3 and checkpoint_problem(ckpt) is None
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1] == {"step": 2, "epoch": 0, "skipped_unreadable": 1, "processes": 1}
    assert [row["step"] for row in rows] == [1, 2, 3]


def test_both_collate_functions_turn_an_unreadable_batch_into_an_empty_one():
    """--decode cpu and --decode device alike: no images, the reasons kept, an empty ``index`` (a skipped step)."""
    from scan_zoo.data.datasets import collate_views
    from scan_zoo.data.device import collate_encoded

    for batch in (
        collate_views([(None, 0, 3, 3, "a.png: broken"), (None, 1, 4, 4, "b.png: broken")]),
        collate_encoded([(None, 0, 3, 3, None, "a.png", "a.png: broken")]),
    ):
        assert batch["index"].numel() == 0 and set(batch) == {"skipped", "index"}
        assert batch["skipped"][0] == "a.png: broken"


def test_ctrl_c_in_eval_linear_is_one_line_and_writes_no_results(tmp_path, monkeypatch, capsys):
    import eval_linear
    from scan_zoo.eval import probe

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(probe, "linear_probe", interrupted)
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4, size=8, val_per_class=2)
    out = tmp_path / "results.json"
    capsys.readouterr()
    code = eval_linear.main(["test_resnet.moco_digits", "--data", str(data), "--out", str(out), "--num-workers", "0"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 130 and len(lines) == 1 and lines[0].startswith("eval_linear.py: interrupted"), lines
    assert not out.exists()
