"""The cluster recipes of scripts/ (docs/cluster.md): they parse, pass only options train.py and accelerate know,
name files that exist, and requeue a preempted job, run by bash against stand-ins for srun/scontrol/squeue."""

import functools
import os
import re
import runpy
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import BIN, PYTHON, ROOT, run_cli

SCRIPTS = ROOT / "scripts"
SHELL = sorted([*SCRIPTS.rglob("*.sh"), *SCRIPTS.rglob("*.sbatch")])
SBATCH = sorted(SCRIPTS.rglob("*.sbatch"))
ACCELERATE_YAML = sorted((SCRIPTS / "accelerate").glob("*.yaml"))


def test_scripts_are_there():
    assert {p.name for p in SBATCH} >= {"scan_4x8.sbatch", "moco_4x8.sbatch"}
    assert (SCRIPTS / "accelerate" / "multinode_4x8.yaml") in ACCELERATE_YAML


@pytest.mark.parametrize("script", SHELL, ids=lambda p: p.name)
def test_bash_parses(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def array_flags(text: str, name: str) -> set[str]:
    """The --options in the bash array ``name=( ... )`` and in its ``name+=( ... )`` appends."""
    flags = set()
    for body in re.findall(rf"^\s*{name}\+?=\((.*?)\)\s*$", text, flags=re.S | re.M):
        words = shlex.split(body, comments=True)
        flags |= {w.split("=")[0] for w in words if w.startswith("--")}
    return flags


@functools.cache
def help_flags(cmd: tuple[str, ...]) -> set[str]:
    r = run_cli(list(cmd), timeout=120)
    assert r.returncode == 0, r.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", r.stdout))


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_train_flags_exist(script):
    flags = array_flags(script.read_text(), "TRAIN_ARGS")
    assert "--config" in flags and "--resume" in flags
    missing = sorted(flags - help_flags((PYTHON, "train.py", "--help")))
    assert not missing, f"{script.name} passes options train.py does not have: {missing}"


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_accelerate_flags_exist(script):
    launch = re.search(r"exec accelerate launch(.*?)train\.py", script.read_text(), flags=re.S).group(1)
    flags = set(re.findall(r"--[a-z_]+", launch))
    assert {"--config_file", "--machine_rank", "--main_process_ip"} <= flags
    missing = sorted(flags - help_flags((str(BIN / "accelerate"), "launch", "--help")))
    assert not missing, f"{script.name} passes options accelerate launch does not have: {missing}"


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_named_files_exist(script):
    text = script.read_text()
    for var in ("RECIPE", "ACCELERATE_CONFIG"):
        value = re.search(rf"^{var}=(\S+)", text, flags=re.M).group(1)
        assert (ROOT / value).is_file(), f"{script.name}: {var}={value} does not exist"
    for sourced in re.findall(r"^source (\S+)", text, flags=re.M):
        assert (ROOT / sourced).is_file()
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+", text, flags=re.M)
    assert re.search(r"^#SBATCH --requeue", text, flags=re.M)


@pytest.mark.parametrize("path", ACCELERATE_YAML, ids=lambda p: p.name)
def test_accelerate_yaml_is_an_accelerate_config(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))  # unknown keys raise
    assert cfg.num_machines >= 2 and cfg.num_processes % cfg.num_machines == 0


def test_4x8_yaml_is_the_recipes_process_count():
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(SCRIPTS / "accelerate" / "multinode_4x8.yaml"))
    recipe = re.search(r"^RECIPE=(\S+)", (SCRIPTS / "slurm" / "scan_4x8.sbatch").read_text(), flags=re.M).group(1)
    meta = yaml.safe_load((ROOT / recipe).read_text())["_meta"]
    assert (cfg.num_machines, cfg.num_processes) == (4, meta["processes"]["value"])


# ------------------------------------------------------------------ the sbatch scripts, run by bash
def fake_bin(tmp: Path) -> Path:
    """srun runs its command here as node 0; accelerate records its arguments, then exits FAKE_RC or, with
    FAKE_RC=wait, waits for SIGUSR1 and exits 138; scontrol and squeue answer as on a 1-node allocation."""
    b = tmp / "bin"
    b.mkdir()
    scripts = {
        "srun": 'export SLURM_NODEID=0\nexec "$@"\n',
        "accelerate": (
            'printf "%s\\n" "$@" > "$FAKE_LOG/accelerate.args"\n'
            "if [[ $FAKE_RC == wait ]]; then\n"
            "  trap 'echo USR1 > \"$FAKE_LOG/usr1\"; exit 138' USR1\n"
            '  touch "$FAKE_LOG/ready"\n'
            "  while true; do sleep 0.05; done\n"
            'fi\nexit "$FAKE_RC"\n'
        ),
        "scontrol": ('if [[ $1 == show ]]; then echo node001; else echo "$@" >> "$FAKE_LOG/scontrol"; fi\n'),
        "squeue": 'echo "$FAKE_LEFT"\n',
    }
    for name, body in scripts.items():
        (b / name).write_text("#!/bin/bash\n" + body)
        (b / name).chmod(0o755)
    return b


def start(script: str, tmp: Path, rc, nodes: int = 4, restarts: int = 0, left: str = "1:00:00", lr: str = "0.1"):
    """Run ``script`` as the batch shell of an allocation of ``nodes`` nodes; ``lr=None``: the script computes
    it (a Python start, slow on a loaded machine), else LR is set."""
    log = tmp / "log"
    log.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PATH": f"{fake_bin(tmp)}:{BIN}:/usr/bin:/bin",
        "REPO": str(ROOT),
        "DATA": "/data/in1k",
        "OUT": str(tmp / "run"),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": "node[001-004]",
        "SLURM_RESTART_COUNT": str(restarts),
        "FAKE_RC": str(rc),
        "FAKE_LOG": str(log),
        "FAKE_LEFT": left,
    }
    if lr is not None:
        env["LR"] = lr
    proc = subprocess.Popen(
        ["bash", str(SCRIPTS / "slurm" / script)],
        env=env,
        cwd=tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, log


def launched(log: Path) -> list[str]:
    return (log / "accelerate.args").read_text().splitlines()


def value_after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("script", ["scan_4x8.sbatch", "moco_4x8.sbatch"])
def test_finished_run_is_not_requeued(script, tmp_path):
    proc, log = start(script, tmp_path, 0)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert not (log / "scontrol").exists()
    args = launched(log)
    assert value_after(args, "--machine_rank") == "0" and value_after(args, "--main_process_ip") == "node001"
    assert value_after(args, "--num_processes") == "32" and value_after(args, "--num_machines") == "4"
    assert value_after(args, "--resume") == "latest"
    assert value_after(args, "--time-limit") == str(3600 - 240)
    assert (
        Path(value_after(args, "--config")).name
        == {"scan_4x8.sbatch": "scan_in1k.yaml", "moco_4x8.sbatch": "moco_v2_in1k.yaml"}[script]
    )


@pytest.mark.slow  # a Python start per case inside the script: slow on a loaded machine
@pytest.mark.parametrize(
    "script, nodes, lr",
    [
        ("scan_4x8.sbatch", 1, 0.4),  # 8 x 384 = 3,072: a quarter of the paper's 1.6
        ("moco_4x8.sbatch", 4, 0.12),  # MoCo-v2's 0.03 for 256; 32 x 32 = 1,024
    ],
)
def test_lr_scaled_to_the_launch(script, nodes, lr, tmp_path):
    proc, log = start(script, tmp_path, 0, nodes=nodes, lr=None)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert float(value_after(launched(log), "--lr")) == pytest.approx(lr, rel=1e-9)
    assert value_after(launched(log), "--num_processes") == str(8 * nodes)


@pytest.mark.parametrize(
    "recipe, processes, batch, lr",
    [
        ("scan_in1k.yaml", 32, None, 1.6),  # the paper: 32 x 384 at 1.6
        ("scan_in1k.yaml", 8, None, 0.4),
        ("scan_in1k.yaml", 32, 192, 0.8),  # 64 anchors x 3 per GPU
        ("moco_v2_in1k.yaml", 8, None, 0.03),
        ("moco_v2_in1k.yaml", 32, None, 0.12),
    ],
)
def test_scaled_lr_script(recipe, processes, batch, lr, capsys):
    main = runpy.run_path(str(SCRIPTS / "slurm" / "scaled_lr.py"))["main"]
    argv = [str(ROOT / "scan_zoo" / "recipes" / recipe), str(processes)] + (
        ["--batch-size", str(batch)] if batch else []
    )
    assert main(argv) == 0
    assert float(capsys.readouterr().out) == pytest.approx(lr, rel=1e-9)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["scan_zoo/recipes/digits_scan.yaml", "2"], "_meta.processes"),  # no reference batch stated
        (["scan_zoo/recipes/no_such.yaml", "2"], "not found"),
        (["scan_zoo/recipes/scan_in1k.yaml", "0"], "at least 1"),
    ],
)
def test_scaled_lr_script_errors(argv, says, capsys):
    main = runpy.run_path(str(SCRIPTS / "slurm" / "scaled_lr.py"))["main"]
    assert main([str(ROOT / argv[0]), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scaled_lr.py: error: ") and says in err and err.count("\n") == 1


def test_preempted_status_requeues(tmp_path):
    proc, log = start("scan_4x8.sbatch", tmp_path, 75)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75
    assert (log / "scontrol").read_text().split() == ["requeue", "4242"], err


@pytest.mark.parametrize("rc", [1, 2, 3])
def test_failure_without_notice_is_not_requeued(rc, tmp_path):
    proc, log = start("moco_4x8.sbatch", tmp_path, rc)
    proc.communicate(timeout=120)
    assert proc.returncode == rc and not (log / "scontrol").exists()


def test_requeue_stops_after_requeue_max(tmp_path):
    proc, log = start("scan_4x8.sbatch", tmp_path, 75, restarts=50)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75 and not (log / "scontrol").exists()
    assert "REQUEUE_MAX" in err


def test_no_time_limit_when_unlimited(tmp_path):
    proc, log = start("scan_4x8.sbatch", tmp_path, 0, left="UNLIMITED")
    proc.communicate(timeout=120)
    assert "--time-limit" not in launched(log)


@pytest.mark.parametrize("script", ["scan_4x8.sbatch", "moco_4x8.sbatch"])
def test_usr1_notice_reaches_the_step_and_requeues(script, tmp_path):
    proc, log = start(script, tmp_path, "wait")
    deadline = time.monotonic() + 60
    while not (log / "ready").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the fake step never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does: the batch shell only
    _, err = proc.communicate(timeout=60)
    assert (log / "usr1").exists(), err  # passed on to the launcher
    assert proc.returncode == 138  # the launcher's status after the signal, reported as it was
    assert (log / "scontrol").read_text().split() == ["requeue", "4242"], err
    assert "preemption notice" in err
