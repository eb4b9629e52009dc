import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def make_image_folder(root: Path, classes: int = 3, per_class: int = 16, size: int = 16, seed: int = 0,
                      val_per_class: int = 4) -> Path:
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


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from scan_zoo.data.digits import render_digits

    return render_digits(tmp_path_factory.mktemp("digits") / "digits", progress=False)


def run_cli(args, env=None, timeout=600):
    """Run a command with the test interpreter's environment; returns CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


PYTHON = sys.executable
BIN = Path(sys.executable).parent
