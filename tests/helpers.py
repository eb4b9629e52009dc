"""Plain helpers the tests share (data, subprocesses, launches, naive references); fixtures are in conftest.py.

Test modules import from here, never from one another.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file

from scan_zoo.train.checkpoints import list_checkpoints
from scan_zoo.train.config import build_config

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BIN = Path(sys.executable).parent


def make_image_folder(
    root: Path, classes: int = 3, per_class: int = 16, size: int = 16, seed: int = 0, val_per_class: int = 4
) -> Path:
    """A small ImageFolder (train/ and val/) of coloured noise with a class-dependent tint."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                tint = np.array([(c * 80) % 256, (c * 150 + 40) % 256, (c * 30 + 90) % 256])
                img = np.clip(rng.normal(tint, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def run_cli(args, env=None, timeout=600):
    """Run a command with the test interpreter's environment; returns CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMON = [
    "--model",
    "test_resnet",
    "--image-size",
    "16",
    "--eval-resize",
    "16",
    "--num-workers",
    "0",
    "--log-every-steps",
    "1",
]


def launch_cmd(args) -> list[str]:
    """The command line of train.py under ``accelerate launch`` with two CPU processes (gloo) on this machine."""
    return [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "train.py",
        *args,
    ]


def launch(args, env=None):
    """Run :func:`launch_cmd` to its end; returns CompletedProcess."""
    return run_cli(launch_cmd(args), env=env)


def cfg_for(data, out, **kw):
    """A tiny MoCo run's config on ``data`` (48 images: 6 steps an epoch), ``kw`` overriding."""
    base = dict(
        method="moco",
        model="test_resnet",
        data=str(data),
        output_dir=str(out),
        epochs=2,
        batch_size=8,
        queue_size=16,
        image_size=16,
        eval_resize=16,
        num_workers=0,
        log_every_steps=1,
        lr=0.05,
        seed=1,
    )
    base.update(kw)
    return build_config(base)


def model_state(run_dir: Path) -> dict:
    """The model weights of a run's newest checkpoint."""
    return load_file(str(list_checkpoints(run_dir)[-1] / "model.safetensors"))


def paused(cmd: list, pause: str | None) -> list:
    """``cmd`` (a train.py command line, launched or not) with train.py replaced by tests/pause_train.py, which
    pauses at the ``point:step[,...]`` events in ``pause`` (None: ``cmd`` unchanged)."""
    if not pause:
        return list(cmd)
    i = cmd.index("train.py")
    return [*cmd[:i], str(ROOT / "tests" / "pause_train.py"), "--pause", pause, *cmd[i + 1 :]]


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, ref: Path, processes: int = 1) -> None:
    """Exported backbone and the whole final training state (key encoder, queue, optimizer, every process's RNG
    states) are bit-identical; every step is logged once, with the same loss."""
    a, b = load_file(str(run / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].numpy().tobytes() == b[k].numpy().tobytes(), k
    last_run, last_ref = list_checkpoints(run)[-1], list_checkpoints(ref)[-1]
    assert last_run.name == last_ref.name
    for name in ("model.safetensors", "optimizer.bin", *(f"random_states_{r}.pkl" for r in range(processes))):
        assert (last_run / name).read_bytes() == (last_ref / name).read_bytes(), name
    rows, ref_rows = metric_rows(run), metric_rows(ref)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(1, len(ref_rows) + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("step_")]
    assert not leftovers


def sigkill(proc: subprocess.Popen, markers: list[Path]) -> None:
    """SIGKILL every process paused at ``markers`` (each holds its pid) and the process group of ``proc``."""
    pids = [int(m.read_text()) for m in markers]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in pids:
        deadline = time.monotonic() + 30
        while _running(pid):
            assert time.monotonic() < deadline, f"process {pid} survived SIGKILL"
            time.sleep(0.02)
    for m in markers:
        m.unlink()


def _running(pid: int) -> bool:
    """Neither gone nor a zombie that nobody has reaped yet."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def naive_info_nce(anchors) -> float:
    """The one naive InfoNCE every loss test reduces to: a float64 loop with math.exp.

    ``anchors`` yields ``(logits, positives, denominator)`` per anchor: its logits as floats, the indices of
    its positives, and the indices summed in its denominator. An anchor's loss is the mean over its positives
    p of -(logit_p - log sum_{j in denominator} exp(logit_j)); anchors with no positive or an empty
    denominator are skipped, and the result is the mean over the rest (0.0 when none is left).
    """
    losses = []
    for logits, positives, denominator in anchors:
        positives, denominator = list(positives), list(denominator)
        if not positives or not denominator:
            continue
        log_den = math.log(sum(math.exp(float(logits[j])) for j in denominator))
        losses.append(-sum(float(logits[p]) - log_den for p in positives) / len(positives))
    return sum(losses) / len(losses) if losses else 0.0
