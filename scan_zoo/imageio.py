"""Reading images from folders that real data sets fill: odd modes converted, broken files reported.

Every image becomes 8-bit RGB: palette, grey, grey+alpha, RGBA, CMYK and 16-bit images are converted
(16-bit values are scaled, not clipped). A very large JPEG is decoded at a reduced scale (libjpeg's DCT
scaling, 1/2 to 1/8) so that its shorter side stays at least ``MAX_SIDE`` pixels: training crops and
resizes to a few hundred pixels anyway, and a 50-megapixel photo then costs memory and time like a small one. A file that cannot be decoded (truncated, zero bytes, not an
image, a decompression bomb) raises :class:`UnreadableImage` naming the file; training skips such files,
counts them and lists them in the run directory, or with ``--strict-data`` refuses the data set up front.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
MAX_SIDE = 2048  # large JPEGs are decoded at the smallest DCT scale whose shorter side is still >= this


class UnreadableImage(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def rgb_loader(path: str) -> Image.Image:
    """Open, decode fully and convert to RGB; :class:`UnreadableImage` if the file cannot be decoded."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            if img.format == "JPEG" and min(img.size) > 2 * MAX_SIDE:
                w, h = img.size
                scale = MAX_SIDE / min(w, h)
                img.draft("RGB", (int(w * scale) + 1, int(h * scale) + 1))  # shorter side stays >= MAX_SIDE
            img.load()
        return to_rgb(img)
    except _DECODE_ERRORS as e:
        raise UnreadableImage(path, f"{type(e).__name__}: {e}") from None


def verify_images(paths, progress: bool = True) -> None:
    """Decode every file; raise :class:`UnreadableImage` on the first that fails (``--strict-data``)."""
    from tqdm.auto import tqdm

    for path in tqdm(paths, desc="verifying images", unit="img", disable=not progress):
        rgb_loader(path)
