"""Preemption: SIGTERM or SIGUSR1 (``--preempt-signals``), ``--time-limit`` and ``SLURM_JOB_END_TIME`` stop a run
between two steps with a checkpoint and exit status 75, in one line; ``--resume latest`` then ends bit-identical
to the run left alone. The signals are real (``os.kill`` / ``os.killpg``) on real train.py processes, paused at a
known step by tests/pause_train.py.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    COMMON,
    PYTHON,
    ROOT,
    assert_same_run,
    launch,
    launch_cmd,
    make_image_folder,
    metric_rows,
    paused,
    run_cli,
)

from scan_zoo.common.errors import UserError
from scan_zoo.train.checkpoints import checkpoint_problem, list_checkpoints
from scan_zoo.train.interrupt import Deadline, parse_duration, parse_signals

# 48 images, 8 a step: 6 steps an epoch, 18 in all; checkpoints every 4 steps, two kept
ARGS = [
    *COMMON,
    "--method",
    "moco",
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
    "--deterministic",
    "true",
]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LINE = re.compile(
    r"^train\.py: preempted \((.+)\) at step (\d+); the last checkpoint is (\S+); "
    r"requeue and continue with --resume latest$"
)


def train_cmd(data, run_dir, *extra):
    return [PYTHON, "train.py", "--data", str(data), "--output-dir", str(run_dir), *ARGS, *extra]


def train(data, run_dir, *extra, env=None):
    return run_cli(train_cmd(data, run_dir, *extra), env={**ENV, **(env or {})})


def start(cmd, pause, env=None):
    """``cmd`` paused at ``pause``, in a session of its own (os.killpg reaches its DataLoader workers too)."""
    return subprocess.Popen(
        paused(cmd, pause),
        cwd=ROOT,
        env={**os.environ, **ENV, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(markers, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not all(m.is_file() for m in markers):
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before pausing:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "never paused"
        time.sleep(0.05)


def finish(proc, timeout=300):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


def preempted(err: str) -> tuple[str, int, Path]:
    """(why, step, checkpoint) of the one ``preempted`` line, which must be the last line of stderr."""
    assert "Traceback" not in err, err[-3000:]
    assert err.count("train.py: preempted") == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    m = LINE.match(lines[-1])
    assert m, err[-3000:]
    return m.group(1), int(m.group(2)), Path(m.group(3))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("preempt") / "data")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The run left alone, which every preempted and resumed run must end identical to."""
    run = tmp_path_factory.mktemp("reference") / "run"
    p = train(data, run)
    assert p.returncode == 0, p.stderr[-3000:]
    return run


def resume_to_the_end(data, run, reference):
    p = train(data, run, "--resume", "latest")
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(run, reference)


# ------------------------------------------------------------------------------------------ signals
@pytest.mark.slow
@pytest.mark.parametrize("sig, times", [(signal.SIGTERM, 1), (signal.SIGUSR1, 1), (signal.SIGTERM, 2)])
def test_a_signal_mid_epoch_checkpoints_exits_75_and_the_resume_is_bit_identical(data, reference, tmp_path, sig, times):
    """Sent to the whole process group, DataLoader workers included (as a scheduler signals every process of the
    job); a second signal changes nothing."""
    run = tmp_path / "run"
    p = start(train_cmd(data, run, "--num-workers", "2"), "step:10")  # epoch 1, 4 of its 6 steps done
    marker = run / ".paused_step_10.0"
    wait_for([marker], p)
    for _ in range(times):
        os.killpg(p.pid, sig)
        time.sleep(0.3)  # two signals before the handler ran would count as one
    marker.unlink()
    rc, err = finish(p)
    assert rc == 75, err[-3000:]
    why, step, ckpt = preempted(err)
    assert why == sig.name and step == 10 and ckpt == run / "checkpoints" / "step_00000010"
    assert checkpoint_problem(ckpt, verify=True) is None
    assert [c.name for c in list_checkpoints(run)] == ["step_00000008", "step_00000010"]
    assert [r["step"] for r in metric_rows(run)] == list(range(1, 11))
    assert not (run / "model.safetensors").exists()  # an unfinished run exports nothing
    resume_to_the_end(data, run, reference)


def test_preempt_signals_none_lets_sigterm_end_the_process_at_once(data, tmp_path):
    run = tmp_path / "run"
    p = start(train_cmd(data, run, "--preempt-signals", "none"), "step:2")
    marker = run / ".paused_step_2.0"
    wait_for([marker], p)
    os.kill(p.pid, signal.SIGTERM)
    rc, err = finish(p)
    assert rc == -signal.SIGTERM, err[-3000:]
    assert "preempted" not in err and list_checkpoints(run) == []


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_and_resume_bit_identical(data, tmp_path):
    """accelerate launch, 2 CPU processes: SIGTERM to the launcher and both processes (the launcher passes it
    on once more). Both finish step 4, rank 0 writes the checkpoint, both exit 75 (the launcher, after the
    signal, 143), one line."""
    args = ["--data", str(data), *ARGS, "--num-workers", "0"]
    ref = tmp_path / "ref"
    p = launch([*args, "--output-dir", str(ref)], env=ENV)  # 48 images, 2 x 8 a step: 3 steps an epoch, 9 in all
    assert p.returncode == 0, p.stderr[-3000:]

    run = tmp_path / "run"
    cmd = launch_cmd([*args, "--output-dir", str(run)])
    p = start(cmd, "step:4")
    markers = [run / f".paused_step_4.{r}" for r in (0, 1)]
    wait_for(markers, p)
    os.killpg(p.pid, signal.SIGTERM)
    time.sleep(0.5)
    for m in markers:
        m.unlink()
    rc, err = finish(p)
    assert rc in (75, 128 + signal.SIGTERM), err[-3000:]  # the launcher's own status after a SIGTERM
    assert "Traceback" not in err and err.count("train.py: preempted") == 1, err[-3000:]
    line = next(ln for ln in err.splitlines() if ln.startswith("train.py: preempted"))
    m = LINE.match(line)
    assert m and m.group(1) == "SIGTERM" and int(m.group(2)) == 4, line
    assert checkpoint_problem(Path(m.group(3)), verify=True) is None
    assert [c.name for c in list_checkpoints(run)][-1] == "step_00000004"

    p = launch([*args, "--output-dir", str(run), "--resume", "latest"], env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(run, ref, processes=2)


def test_a_signal_outside_the_training_steps_is_one_line_and_loses_nothing(data, tmp_path, monkeypatch, capsys):
    """SIGTERM while exporting (after the final checkpoint): exit 75 in one line; the resume exports."""
    sys.path.insert(0, str(ROOT))
    import train
    from scan_zoo.train.trainer import Trainer

    def export(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises at once
        raise AssertionError("SIGTERM did not stop the export")

    run = tmp_path / "run"
    args = ["--data", str(data), "--output-dir", str(run), *ARGS, "--max-steps", "2"]
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        m.setattr(Trainer, "export", export)
        assert train.main(args) == 75
    assert signal.getsignal(signal.SIGTERM) == before
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("train.py:")]
    assert lines == [
        "train.py: preempted (SIGTERM) outside the training steps; requeue and continue with --resume latest"
    ]
    assert checkpoint_problem(run / "checkpoints" / "step_00000002", verify=True) is None
    assert train.main([*args, "--resume", "latest"]) == 0
    assert (run / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------- time limits
@pytest.mark.slow
def test_time_limit_checkpoints_exits_75_and_the_resume_is_bit_identical(data, reference, tmp_path):
    """A limit already spent when training starts (the imports alone take longer than 1 s) stops before the
    next step: at a fresh start (step 0's checkpoint), and in a resumed run (its checkpoint is the last one)."""
    run = tmp_path / "run"
    p = train(data, run, "--time-limit", "1")
    assert p.returncode == 75, p.stderr[-3000:]
    why, step, ckpt = preempted(p.stderr)
    assert why == "--time-limit 1 reached" and step == 0 and ckpt == run / "checkpoints" / "step_00000000"
    assert checkpoint_problem(ckpt, verify=True) is None

    p = train(data, run, "--resume", "latest", "--stop-after-steps", "10")
    assert p.returncode == 0, p.stderr[-3000:]
    p = train(data, run, "--resume", "latest", "--time-limit", "00:00:01")
    assert p.returncode == 75, p.stderr[-3000:]
    why, step, ckpt = preempted(p.stderr)
    assert step == 10 and ckpt == run / "checkpoints" / "step_00000010"
    resume_to_the_end(data, run, reference)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["past", "near"])
def test_slurm_job_end_time_is_the_deadline(data, reference, tmp_path, when):
    """In the past: stop before the first step. Near (an hour left, against a margin of an hour): the same."""
    run = tmp_path / "run"
    end, extra = (time.time() - 10, []) if when == "past" else (time.time() + 3600, ["--time-limit-margin", "3600"])
    p = train(data, run, *extra, env={"SLURM_JOB_END_TIME": str(int(end))})
    assert p.returncode == 75, p.stderr[-3000:]
    why, step, ckpt = preempted(p.stderr)
    assert why == "the SLURM job's end time reached" and step == 0
    assert checkpoint_problem(ckpt, verify=True) is None
    if when == "past":
        resume_to_the_end(data, run, reference)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--time-limit", "abc"),
        ("--time-limit", "-5"),
        ("--time-limit", "1:99:00"),
        ("--time-limit", "0"),
        ("--time-limit", "nan"),
        ("--preempt-signals", "TERM,FOO"),
        ("--preempt-signals", "INT"),
        ("--time-limit-margin", "-1"),
    ],
)
def test_a_bad_value_is_one_line_and_exit_2(tmp_path, flag, value, capsys):
    sys.path.insert(0, str(ROOT))
    import train

    assert train.main(["--method", "moco", "--output-dir", str(tmp_path / "run"), flag, value]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and flag.lstrip("-").split("-")[0] in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_bad_slurm_job_end_time_is_one_line(data, tmp_path):
    p = train(data, tmp_path / "run", "--max-steps", "1", env={"SLURM_JOB_END_TIME": "soon"})
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and lines[-1].startswith("train.py: error: SLURM_JOB_END_TIME"), p.stderr[-3000:]
    assert "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------------- units
def test_durations_read_as_seconds():
    """Against the arithmetic written out by hand."""
    assert parse_duration("90") == 90.0 and parse_duration("2.5") == 2.5
    assert parse_duration("01:30") == 90.0 and parse_duration("1:00:00") == 3600.0
    assert parse_duration("48:00:00") == 48 * 3600.0 and parse_duration("0:00:07") == 7.0
    for bad in ("abc", "-5", "0", "1:99:00", "1:00:60", "1:-1:00", "::", "1:2:3:4", "inf", ""):
        with pytest.raises(UserError):
            parse_duration(bad)


def test_signal_names():
    assert parse_signals("TERM,USR1") == (signal.SIGTERM, signal.SIGUSR1)
    assert parse_signals("sigusr2, TERM,TERM") == (signal.SIGUSR2, signal.SIGTERM)
    assert parse_signals("none") == () and parse_signals("None") == ()
    for bad in ("KILL", "INT", "TERM,", "FOO"):
        with pytest.raises(UserError):
            parse_signals(bad)


def test_the_deadline_keeps_room_for_two_steps_and_a_checkpoint():
    """The margin rule against a fake clock: due when the time left is below 2 x the longest step + the longest
    checkpoint write (a step's time before any checkpoint), or below an explicit margin; always when past."""
    now = [1000.0]
    d = Deadline(end=1100.0, why="x", clock=lambda: now[0])
    assert not d.due()  # nothing measured yet, 100 s left
    d.note_step(30.0)
    assert not d.due()  # needs 2 x 30 + 30 = 90 < 100
    now[0] = 1011.0
    assert d.due()  # 89 left
    d.note_step(10.0)  # the longest step counts
    assert d.due()
    now[0] = 1000.0
    d.note_checkpoint(50.0)
    assert d.due()  # 2 x 30 + 50 = 110 > 100
    d2 = Deadline(end=1100.0, margin=20.0, clock=lambda: now[0])
    d2.note_step(1000.0)  # an explicit margin replaces the measured one
    assert not d2.due()
    now[0] = 1081.0
    assert d2.due()
    now[0] = 1200.0
    assert Deadline(end=1100.0, clock=lambda: now[0]).due()  # past
    assert not Deadline(end=None, clock=lambda: now[0]).due()


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_that_ignore_sigterm_never_block_the_exit(workers):
    """A loader stopped mid-epoch (an error, a benchmark's partial pass) leaves its workers alive until exit, where
    multiprocessing would end them with the SIGTERM they ignore and then wait forever."""
    code = f"""
import signal
from torch.utils.data import DataLoader
from scan_zoo.train import interrupt
loader = DataLoader(range(1000), batch_size=2, num_workers={workers}, persistent_workers=True,
                    worker_init_fn=interrupt.worker_init((signal.SIGTERM, signal.SIGUSR1)))
batches = iter(loader)
next(batches)
print("exiting", flush=True)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "exiting" in r.stdout, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-2000:]
