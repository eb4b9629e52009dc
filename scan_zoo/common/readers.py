"""Readers for files that come from elsewhere: weights, configs, checkpoints.

Each returns what the file holds or raises one :class:`~scan_zoo.common.errors.UserError` naming the file and what is
wrong with it (empty, truncated, not the format, the wrong kind of value), never a parser's traceback. A
``.pth`` archive is sized from its zip directory before it is unpacked, so a small file that inflates to
gigabytes is refused without being loaded.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load, load_file

from scan_zoo.common.errors import UserError

#: a ``.pth`` zip may hold at most this many times its own size (torch.save stores members uncompressed: ~1x)
PTH_MAX_INFLATION = 4
#: and its compressed members may inflate to at most this many bytes in all
PTH_MAX_INFLATED_BYTES = 2 << 30


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _readable_file(path: Path, what: str) -> int:
    """The size of ``path``, which must be a non-empty regular file."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path} is empty (0 bytes): not a {what}; copy or export it again")
    return size


def read_safetensors(path: str | Path, data: bytes | None = None) -> dict:
    """The tensors of a safetensors file (or of its bytes ``data``, already read), by name."""
    path = Path(path)
    if data is None:
        _readable_file(path, "safetensors file")
    elif not data:
        raise UserError(f"{path} is empty (0 bytes): not a safetensors file; copy or export it again")
    try:
        return load(data) if data is not None else load_file(str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError, and OSError / ValueError of odd files
        raise UserError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {_first_line(e)}"
        ) from None


def read_safetensors_metadata(path: str | Path) -> dict:
    """The string metadata of a safetensors file's header, without reading its tensors."""
    path = Path(path)
    _readable_file(path, "safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {_first_line(e)}"
        ) from None


def _read_text(path: Path, what: str) -> str:
    _readable_file(path, what)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not a {what}: not UTF-8 text ({_first_line(e)})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {_first_line(e)}") from None


def parse_json_object(text: str, source: str) -> dict:
    """``text`` parsed as JSON, which must be an object; ``source`` names it in errors."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{source} is not valid JSON: {_first_line(e)}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{source} holds a JSON {type(obj).__name__}, not an object ({{...}})")
    return obj


def read_json_object(path: str | Path) -> dict:
    """A JSON file whose top level is an object (``config.json``, ``eval_results.json``)."""
    path = Path(path)
    return parse_json_object(_read_text(path, "JSON file"), str(path))


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping; an empty file is ``{}``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"YAML file not found: {path}")
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not a YAML file: not UTF-8 text ({_first_line(e)})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a YAML {type(obj).__name__}, not a mapping (key: value lines)")
    return obj


def check_pth_inflation(path: Path, size: int) -> None:
    """Refuse a zip ``.pth`` whose members would inflate past :data:`PTH_MAX_INFLATION` x its size or,
    compressed, past :data:`PTH_MAX_INFLATED_BYTES`; read from the zip directory, nothing unpacked."""
    if not zipfile.is_zipfile(path):
        return  # the legacy (pre-1.6) format: a pickle, no archive to inflate
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable PyTorch checkpoint: broken zip archive ({_first_line(e)})") from None
    total = sum(m.file_size for m in members)
    inflated = sum(m.file_size for m in members if m.compress_type != zipfile.ZIP_STORED)
    if total > PTH_MAX_INFLATION * size or inflated > PTH_MAX_INFLATED_BYTES:
        raise UserError(
            f"refusing {path}: its {size:,} bytes would inflate to {total:,} bytes when loaded "
            f"(more than {PTH_MAX_INFLATION}x the file, or over {PTH_MAX_INFLATED_BYTES >> 30} GiB "
            "compressed); torch.save never writes such an archive"
        )


def read_pth(path: str | Path):
    """What a ``.pth``/``.pth.tar`` holds, loaded with ``torch.load(weights_only=True)`` on the CPU after its
    inflated size was checked: tensors and plain containers only, never code."""
    path = Path(path)
    size = _readable_file(path, "PyTorch checkpoint")
    check_pth_inflation(path, size)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"refusing {path}: it holds Python objects other than tensors and plain containers, "
            f"which could run code when loaded ({_first_line(e)})"
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated or foreign files
        raise UserError(f"cannot read {path} as a PyTorch checkpoint: {_first_line(e)}") from None
