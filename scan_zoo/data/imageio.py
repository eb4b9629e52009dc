"""Reading images from folders that real data sets fill: odd modes converted, broken files reported.

Every image becomes 8-bit RGB: palette, grey, grey+alpha, RGBA, CMYK and 16-bit images are converted
(16-bit values are scaled, not clipped). A very large JPEG is decoded at a reduced scale (libjpeg's DCT
scaling, 1/2 to 1/8) so that its shorter side stays at least ``MAX_SIDE`` pixels: training crops and
resizes to a few hundred pixels anyway, and a 50-megapixel photo then costs memory and time like a small one. A file that cannot be decoded (truncated, zero bytes, not an
image, a decompression bomb, or not a regular file: a FIFO, socket or device, which is never read, so it cannot
block) raises :class:`UnreadableImage` naming the file; training skips such files, counts them and lists them in
the run directory, or with ``--strict-data`` refuses the data set up front.

File names are whatever bytes the file system holds. Wherever one is written for a person or a parser (a log,
``skipped_images.txt``, a JSON file) it goes through :func:`display_path`: one line of valid UTF-8 whatever the
name contains.
"""

from __future__ import annotations

import os
import re
import stat

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
MAX_SIDE = 2048  # large JPEGs are decoded at the smallest DCT scale whose shorter side is still >= this


def one_line(text: str) -> str:
    """``text`` with every character that is not printable (newlines, tabs, control characters, lone surrogates,
    line separators) and every backslash written as a backslash escape: one line of valid UTF-8. A lone surrogate
    U+DC80..U+DCFF (how Python holds a file name's byte 0x80..0xFF that is not UTF-8) is written as that byte."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == " " or ch.isprintable():
            out.append(ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        else:
            code = ord(ch)
            if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the undecodable byte code - 0xDC00
                code -= 0xDC00
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def display_path(path) -> str:
    """A file name (str, bytes or path) as one printable line: the name's bytes decoded as UTF-8, each byte that is
    not UTF-8 written ``\\xNN``, non-printable characters and backslashes escaped (:func:`one_line`). A name
    that is printable UTF-8 without a backslash comes back unchanged."""
    raw = os.fsencode(path)
    text = raw.decode("utf-8", "surrogateescape")  # undecodable bytes -> lone surrogates, escaped below
    return one_line(text)


class UnreadableImage(Exception):
    """A file that cannot be decoded as an image; the message names it (escaped) on one line."""

    def __init__(self, path: str, reason: str):
        reason = one_line(reason)
        super().__init__(f"{display_path(path)}: {reason}")
        self.path, self.reason = path, reason


FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
)


def file_kind(mode: int) -> str:
    """What a non-regular file is, from its ``st_mode``: "a FIFO", "a socket", ..."""
    return next((name for test, name in FILE_KINDS if test(mode)), "not a regular file")


def open_regular(path):
    """Open ``path`` for reading in binary mode, refusing (``UnreadableImage``) anything but a regular file.

    The file is opened non-blocking, so a FIFO with no writer does not hang the caller, and checked with
    ``fstat`` on the open descriptor: what is read is what was checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UnreadableImage(path, f"{type(e).__name__}: {e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnreadableImage(path, f"{file_kind(mode)}, not a regular file: not read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


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
        with open_regular(path) as f:
            img = Image.open(f)
            if img.format == "JPEG" and min(img.size) > 2 * MAX_SIDE:
                w, h = img.size
                scale = MAX_SIDE / min(w, h)
                img.draft("RGB", (int(w * scale) + 1, int(h * scale) + 1))  # shorter side stays >= MAX_SIDE
            img.load()
        return to_rgb(img)
    except _DECODE_ERRORS as e:
        # PIL names the open file object (<_io.BufferedReader name=3>); the path already starts the message
        reason = re.sub(r" ?<_io\.\w+ name=\d+>", "", str(e))
        raise UnreadableImage(path, f"{type(e).__name__}: {reason}") from None


def verify_images(paths, progress: bool = True, left_out=()) -> None:
    """Decode every file; raise :class:`UnreadableImage` on the first that fails (``--strict-data``), or on the
    first of ``left_out`` ((path, reason) of files the listing refused to open, such as FIFOs)."""
    for path, reason in left_out:
        raise UnreadableImage(path, reason)
    for path in tqdm(paths, desc="verifying images", unit="img", disable=not progress):
        rgb_loader(path)
