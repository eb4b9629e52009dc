"""`scan-zoo-launch`: accelerate's launcher without its config warnings, passing the script's exit status on."""

import os

import pytest
from helpers import COMMON, PYTHON, free_port, run_cli

from scan_zoo.common.launch import launch_args
from scan_zoo.common.recipes import ACCELERATE_CONFIG

LAUNCH = [PYTHON, "-m", "scan_zoo.common.launch"]


def clean_home(tmp_path) -> dict:
    """A HOME without the file `accelerate config` writes (and no HF_HOME / XDG_CACHE_HOME pointing at one)."""
    env = {
        "HOME": str(tmp_path / "home"),
        "HF_HOME": str(tmp_path / "home" / "hf"),
        "XDG_CACHE_HOME": str(tmp_path / "home" / "cache"),
    }
    os.makedirs(env["HOME"])
    return env


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_the_shipped_config_is_added_only_when_the_user_has_none():
    assert launch_args(["train.py"], user_default_exists=False) == ["--config_file", str(ACCELERATE_CONFIG), "train.py"]
    assert launch_args(["train.py"], user_default_exists=True) == ["train.py"]
    mine = ["--config_file", "my.yaml", "train.py"]
    assert launch_args(mine, user_default_exists=False) == mine
    assert launch_args(["--config-file=my.yaml", "train.py"], False) == ["--config-file=my.yaml", "train.py"]
    assert ACCELERATE_CONFIG.is_file()


@pytest.mark.slow  # a launcher and a child interpreter: 20-50 s on a busy 2-core CPU
def test_a_bad_option_exits_2_with_one_line(tmp_path):
    out = run_cli([*LAUNCH, "train.py", "--epochs", "-1"], env=clean_home(tmp_path))
    assert out.returncode == 2
    assert lines(out.stderr) == ["train.py: error: bad value in the config: epochs must be at least 1, not -1"]
    out = run_cli([*LAUNCH, "-q", "train.py", "--epochs", "-1"], env=clean_home(tmp_path / "q"))
    assert out.returncode == 2 and len(lines(out.stderr)) == 1  # -q changes nothing


@pytest.mark.slow  # a launcher and a child interpreter: 20-50 s on a busy 2-core CPU
def test_two_processes_pass_the_status_on(tmp_path):
    out = run_cli(
        [
            *LAUNCH,
            "--multi_gpu",
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
            "train.py",
            "--epochs",
            "-1",
        ],
        env=clean_home(tmp_path),
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "warn" not in out.stderr.lower()


@pytest.mark.slow  # a launcher and a child interpreter: 20-50 s on a busy 2-core CPU
def test_plain_accelerate_launch_loses_the_status(tmp_path):
    """What docs/training.md says of plain `accelerate launch`: exit 1 and a traceback (its launcher's doing)."""
    out = run_cli(
        [*LAUNCH[:1], "-m", "accelerate.commands.launch", "train.py", "--epochs", "-1"], env=clean_home(tmp_path)
    )
    assert out.returncode == 1 and "CalledProcessError" in out.stderr
    assert "were not passed to `accelerate launch`" in out.stderr


@pytest.mark.slow  # a launcher and a child interpreter: 20-50 s on a busy 2-core CPU
def test_a_tiny_launch_prints_no_warning(tmp_path, tiny_data):
    out = run_cli(
        [
            *LAUNCH,
            "train.py",
            "--method",
            "moco",
            "--data",
            str(tiny_data),
            *COMMON,
            "--batch-size",
            "8",
            "--queue-size",
            "16",
            "--max-steps",
            "2",
            "--output-dir",
            str(tmp_path / "run"),
        ],
        env=clean_home(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    warnings = [line for line in (out.stdout + out.stderr).splitlines() if "warn" in line.lower()]
    assert warnings == []
    assert "moco: 2 steps" in out.stdout
