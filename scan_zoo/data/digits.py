"""Digit scenes: the embedded default data set, rendered from scikit-learn's 1,797 handwritten digits.

Each 8x8 glyph is drawn ``renders`` times on a ``size`` x ``size`` RGB canvas at a random scale and
position, with random foreground and background colours. The result is an ImageFolder tree
(``train/<class>/*.png``, ``val/<class>/*.png``; split by glyph, so no glyph is in both) and
``metadata.npz`` with, per image: split, relative path, class, bounding box, glyph mask, colours,
scale and position (the transfer suite regresses these "appearance" factors).

Everything is a pure function of the seed: the same arguments always write the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

FORMAT_VERSION = 2
SCALE_RANGE = (0.7, 0.95)  # glyph box side as a fraction of the canvas
META_FILE = "metadata.npz"
DONE_FILE = "digits.json"


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random foreground and background colours: a light glyph (grey 170-255) on a dark ground (grey 0-85),
    each channel tinted by up to +-40. The polarity is fixed (ink is light, as in the source scans) and
    the contrast strong, so the glyph's shape, not its colour, is what separates the classes."""
    fg = np.clip(int(rng.integers(170, 256)) + rng.integers(-40, 41, size=3), 0, 255)
    bg = np.clip(int(rng.integers(0, 86)) + rng.integers(-40, 41, size=3), 0, 255)
    return fg.astype(np.uint8), bg.astype(np.uint8)


def render_scene(glyph: np.ndarray, rng: np.random.Generator, size: int = 32) -> dict:
    """Render one 8x8 glyph (values 0..16) onto a size x size canvas. Returns image, mask and factors."""
    side = int(rng.integers(int(SCALE_RANGE[0] * size), int(SCALE_RANGE[1] * size) + 1))  # glyph side in pixels
    x0 = int(rng.integers(0, size - side + 1))
    y0 = int(rng.integers(0, size - side + 1))
    fg, bg = _colour_pair(rng)
    g = Image.fromarray((glyph.astype(np.float32) * (255.0 / 16.0)).astype(np.uint8), mode="L")
    alpha_box = np.asarray(g.resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0
    alpha = np.zeros((size, size), np.float32)  # [H, W] coverage of the glyph
    alpha[y0 : y0 + side, x0 : x0 + side] = alpha_box
    img = bg[None, None, :] * (1 - alpha[..., None]) + fg[None, None, :] * alpha[..., None]  # [H, W, 3]
    mask = alpha >= 0.5  # [H, W] glyph pixels
    ys, xs = np.nonzero(mask)
    bbox = (
        np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        if len(xs)
        else np.array([x0, y0, x0 + side, y0 + side])
    )
    return {
        "image": np.clip(np.rint(img), 0, 255).astype(np.uint8),
        "mask": mask,
        "bbox": bbox.astype(np.int16),  # x0, y0, x1, y1 of the glyph mask (exclusive end)
        "fg": fg,
        "bg": bg,
        "scale": side / size,
        "position": np.array([(x0 + side / 2) / size, (y0 + side / 2) / size], np.float32),
    }


def render_digits(
    out: str | Path, renders: int = 4, size: int = 32, val_fraction: float = 0.2, seed: int = 0, progress: bool = True
) -> Path:
    """Write the digit-scenes ImageFolder tree into ``out`` (atomically: built aside, then renamed)."""
    # lazy: scikit-learn (~1 s to import) is needed only when the scenes are rendered
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    glyphs, labels = digits.images, digits.target  # [1797, 8, 8] in 0..16, [1797]
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(glyphs), bool)
    for c in range(10):  # stratified split by glyph
        idx = np.flatnonzero(labels == c)
        n_val = int(round(len(idx) * val_fraction))
        is_val[rng.permutation(idx)[:n_val]] = True

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    rows = {k: [] for k in ("split", "path", "label", "glyph", "bbox", "mask", "fg", "bg", "scale", "position")}
    total = len(glyphs) * renders
    with tqdm(total=total, desc="rendering digit scenes", disable=not progress, unit="img") as bar:
        for gi, (glyph, label) in enumerate(zip(glyphs, labels)):
            split = "val" if is_val[gi] else "train"
            for r in range(renders):
                scene = render_scene(glyph, rng, size)
                rel = f"{split}/{label}/{gi:04d}_{r}.png"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(scene["image"], mode="RGB").save(tmp / rel, optimize=False)
                for key, val in (("split", split), ("path", rel), ("label", int(label)), ("glyph", gi)):
                    rows[key].append(val)
                for key in ("bbox", "mask", "fg", "bg", "scale", "position"):
                    rows[key].append(scene[key])
                bar.update(1)
    np.savez_compressed(tmp / META_FILE, **{k: np.asarray(v) for k, v in rows.items()})
    info = {
        "format_version": FORMAT_VERSION,
        "renders": renders,
        "size": size,
        "val_fraction": val_fraction,
        "seed": seed,
        "num_images": total,
        "num_glyphs": len(glyphs),
        "source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
    }
    (tmp / DONE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def default_cache_dir() -> Path:
    base = os.environ.get("SCAN_ZOO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "scan_zoo")
    return Path(base) / "digits"


def ensure_digits(root: str | Path | None = None, progress: bool = True, **kwargs) -> Path:
    """Return a rendered digit-scenes tree, rendering it once if it is missing or was made differently."""
    root = Path(root) if root else default_cache_dir()
    want = {
        "format_version": FORMAT_VERSION,
        "renders": kwargs.get("renders", 4),
        "size": kwargs.get("size", 32),
        "val_fraction": kwargs.get("val_fraction", 0.2),
        "seed": kwargs.get("seed", 0),
    }
    done = root / DONE_FILE
    if done.is_file():
        have = json.loads(done.read_text())
        if all(have.get(k) == v for k, v in want.items()):
            return root
    return render_digits(root, progress=progress, **kwargs)


def load_metadata(root: str | Path) -> dict:
    """The per-image metadata as numpy arrays (paths are relative to ``root``)."""
    with np.load(Path(root) / META_FILE) as z:
        return {k: z[k] for k in z.files}
