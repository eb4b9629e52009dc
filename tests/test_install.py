"""A non-editable install works outside the checkout: `scan-zoo list`, a shipped weight through timm, and the
pipeline with the recipes it ships (package data), in a fresh venv, offline.

The fresh venv sees the test venv's site-packages through a ``.pth`` line (so torch is not reinstalled);
a plain path line processes none of that directory's ``.pth`` files, so the test venv's editable scan_zoo
stays invisible and ``import scan_zoo`` finds only the copy pip installed.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow


def run(args, cwd, env, timeout=300):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "scan_zoo", src / "scan_zoo", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp / "venv"
    # no pip or setuptools of its own: the test venv's (through the .pth line) build and install the wheel
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "test_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        HOME=str(tmp / "home"),
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
    )
    run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(src)],
        cwd=tmp,
        env=env,
        timeout=300,
    )
    work = tmp / "elsewhere"
    work.mkdir()
    return {"python": str(python), "bin": venv / "bin", "site": site, "env": env, "cwd": work}


def test_the_installed_package_is_not_the_checkout(installed):
    out = run(
        [installed["python"], "-c", "import scan_zoo; print(scan_zoo.__file__)"], installed["cwd"], installed["env"]
    )
    where = Path(out.stdout.strip()).resolve()
    assert where.is_relative_to(installed["site"].resolve()) and not where.is_relative_to(ROOT.resolve())


def test_scan_zoo_list_and_a_shipped_weight(installed):
    out = run([str(installed["bin"] / "scan-zoo"), "list"], installed["cwd"], installed["env"])
    assert "test_resnet.scan_digits" in out.stdout
    code = (
        "import scan_zoo, timm, torch; m = timm.create_model('test_resnet.scan_digits', pretrained=True).eval(); "
        "print(m(torch.zeros(1, 3, 32, 32)).shape[0], scan_zoo.__file__)"
    )
    out = run([installed["python"], "-c", code], installed["cwd"], installed["env"])
    assert out.stdout.split()[0] == "1" and str(installed["site"]) in out.stdout


def test_the_pipeline_runs_with_the_installed_recipes(installed):
    """`python -P` leaves the script's folder (the checkout) off sys.path, so train.py imports the installed
    package; without -P Python puts the checkout first and its own scan_zoo (recipes included) is used."""
    out = run(
        [
            installed["python"],
            "-P",
            str(ROOT / "train.py"),
            "--max-steps",
            "5",
            "--num-workers",
            "0",
            "--output-dir",
            str(installed["cwd"] / "run"),
        ],
        installed["cwd"],
        installed["env"],
        timeout=600,
    )
    stages = [line for line in out.stdout.splitlines() if line.startswith("stage ")]
    assert len(stages) == 3, out.stdout
    recipes = [Path(line.rsplit("recipe ", 1)[1].rstrip(")")) for line in (stages[0], stages[2])]
    assert [p.name for p in recipes] == ["digits_moco.yaml", "digits_scan.yaml"]
    for p in recipes:
        assert p.resolve().is_relative_to(installed["site"].resolve()), p
        assert not p.resolve().is_relative_to(ROOT.resolve())
    assert out.stdout.splitlines()[-1].startswith("wall time: ")


def test_scan_zoo_launch_passes_a_bad_option_on(installed):
    out = subprocess.run(
        [str(installed["bin"] / "scan-zoo-launch"), "train.py", "--epochs", "0"],
        cwd=ROOT,
        env=installed["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert [line for line in out.stderr.splitlines() if line.strip()] == [
        "train.py: error: bad value in the config: epochs must be at least 1, not 0"
    ]
