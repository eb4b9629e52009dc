"""Every command and Python snippet in README.md runs, in order, as a newcomer would type them.

The README is walked top to bottom in a scratch directory laid out like a checkout (links to the repository's
files, no runs/ of its own), so a command that depends on an earlier one (the local-dir load after the quick
start, the SCAN stage after mining) sees what that one wrote. What cannot run here as written is adapted in
one stated way, never skipped silently:

- placeholders: ``/path/to/imagenet`` is a small ImageFolder, the MoCo ``.pth.tar`` a checkpoint in the
  official layout, ``HF_TOKEN=...`` a token a loopback stand-in for the Hub accepts;
- ``train.py`` runs get tiny-size flags appended (the recipes are ImageNet-sized; the flags they pass are
  what this checks);
- the setup block's install is what ``.ci/run`` executes for real, so only its training command runs here;
  the test block is this suite itself.

A block this test does not know how to run fails it: a new README snippet needs a decision here.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from helpers import BIN, COMMON, PYTHON, ROOT, make_image_folder
from hubservers import HubWriteStandIn

pytestmark = pytest.mark.slow

BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
TINY = [*COMMON, "--max-steps", "2", "--batch-size", "8", "--queue-size", "16"]
TOKEN = "hf_readme_test_token_0123456789"
NOT_LINKED = {".git", ".venv", "runs", "export", "weights", ".ci-cache", ".pytest_cache", ".hypothesis"}


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block in README.md, in order."""
    return [(lang, text) for lang, text in BLOCK.findall((ROOT / "README.md").read_text())]


def commands(text: str) -> list[str]:
    """The shell commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def official_moco_v2(path: Path) -> None:
    """A checkpoint in the key layout of facebookresearch/moco's main_moco.py (MoCo v2, --mlp)."""
    backbone = timm.create_model("resnet50", num_classes=0).state_dict()
    sd = {}
    for enc in ("encoder_q", "encoder_k"):
        sd.update({f"module.{enc}.{k}": v.clone() for k, v in backbone.items()})
        sd[f"module.{enc}.fc.0.weight"], sd[f"module.{enc}.fc.0.bias"] = torch.randn(2048, 2048), torch.randn(2048)
        sd[f"module.{enc}.fc.2.weight"], sd[f"module.{enc}.fc.2.bias"] = torch.randn(128, 2048), torch.randn(128)
    sd["module.queue"], sd["module.queue_ptr"] = torch.randn(128, 65536), torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": sd, "optimizer": {}}, path)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A scratch directory that looks like a fresh checkout: the repository's files linked, nothing run yet."""
    work = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        if entry.name not in NOT_LINKED:
            (work / entry.name).symlink_to(entry)
    return work


def adapt(cmd: str, work: Path, data: Path) -> str | None:
    """The command as it runs here (see the module docstring), or None for the test block itself."""
    if "pytest" in cmd:
        return None
    if cmd.startswith("python3 -m venv"):
        cmd = cmd.split("&&")[-1].strip()  # the install: .ci/run does it on a fresh machine
    cmd = cmd.replace("/path/to/imagenet", str(data)).replace("HF_TOKEN=...", f"HF_TOKEN={TOKEN}")
    if "moco_v2_800ep_pretrain.pth.tar" in cmd and not (work / "moco_v2_800ep_pretrain.pth.tar").exists():
        official_moco_v2(work / "moco_v2_800ep_pretrain.pth.tar")
    if "train.py" in shlex.split(cmd):
        cmd += " " + shlex.join(TINY)
    return cmd


def test_every_readme_snippet_runs(checkout, tmp_path):
    data = make_image_folder(tmp_path / "imagefolder", classes=3, per_class=8, size=16)
    blocks = readme_blocks()
    assert any(lang == "bash" for lang, _ in blocks) and any(lang == "python" for lang, _ in blocks)
    lock = tmp_path / "zoo_lock.json"  # publish records into a copy, never the repository's lock
    lock.write_bytes((ROOT / "scan_zoo" / "zoo_lock.json").read_bytes())
    ran = []
    with HubWriteStandIn(token=TOKEN) as hub:
        env = {
            **hub.client_env(tmp_path / "hf_home"),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PYTHONUNBUFFERED": "1",
            "SCAN_ZOO_LOCK": str(lock),
        }
        for lang, text in blocks:
            if lang == "bash":
                todo = [c for c in (adapt(c, checkout, data) for c in commands(text)) if c]
                runs = [["bash", "-euo", "pipefail", "-c", c] for c in todo]
            elif lang == "python":
                runs = [[PYTHON, "-c", text]]
            else:
                assert lang == "", f"README block in {lang!r}: teach tests/test_readme.py to run it"
                continue  # sample output
            for argv in runs:
                r = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
                assert r.returncode == 0, (
                    f"README snippet failed (exit {r.returncode}):\n{argv[-1]}\n{r.stderr[-3000:]}"
                )
                ran.append(argv[-1])
        assert not hub.unexpected()
        assert any(repo.startswith("my-org/") for repo in hub.repos), "the README's publish uploaded nothing"
    # a user's own export is published, never recorded in the zoo's lock
    assert lock.read_bytes() == (ROOT / "scan_zoo" / "zoo_lock.json").read_bytes()
    assert any("publish" in c for c in ran) and any("eval_linear.py" in c for c in ran)
