"""Hub artefacts: export a run as a zoo model, publish it, download and verify zoo weights.

An exported model is a folder of three files, the same on disk, on the Hub and inside the package:

- ``model.safetensors``: the backbone alone, plain timm keys (``num_classes=0``);
- ``config.json``: timm's Hub config (``timm.create_model('hf-hub:ORG/NAME')`` reads it), with scan_zoo's own
  metadata at the top level under ``scan_zoo`` (unknown keys inside ``pretrained_cfg`` break timm's loader);
- ``README.md``: the model card, generated (:mod:`scan_zoo.zoo.cards`);
- ``eval_results.json`` when the model was evaluated (``eval_linear.py``).

Weights are safetensors only; every sha256 the registry knows is checked before a file is read. Zoo weights
are downloaded by :func:`download_weights` alone: it asks the Hub for the lock's commit id, and every part of
the cache path it writes comes from the checked lock entry, never from the server's reply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from datetime import date
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token, hf_hub_url
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
from timm.models._hub import save_config_for_hf

from scan_zoo.common.errors import UserError
from scan_zoo.common.files import sha256_file
from scan_zoo.common.readers import read_json_object, read_safetensors
from scan_zoo.models.backbones import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    create_backbone,
    load_strict,
)
from scan_zoo.zoo.cards import model_card
from scan_zoo.zoo.hub_errors import hub_call
from scan_zoo.zoo.registry import (
    ENTRIES,
    ZooEntry,
    check_repo_id,
    check_revision,
    check_sha256,
    get_entry,
    lock_path,
    read_lock,
    record,
)
from scan_zoo.zoo.timm_cfg import pretrained_cfg

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
RESULTS_NAME = "eval_results.json"


# ------------------------------------------------------------------------------------------- checks

#: files whose sha256 this process has checked: (path, device, inode, size, mtime_ns, ctime_ns) -> sha256.
#: Any write to a file changes its ctime (which no user call can set back) and so its key: a changed file
#: is hashed again. Only files last changed VERIFIED_MIN_AGE_S before they were hashed are remembered, so a
#: write landing in the same timestamp tick as the check cannot hide behind an unchanged key.
_VERIFIED: dict = {}
VERIFIED_MIN_AGE_S = 2.0
#: weights up to this size are read once: the bytes hashed are the bytes deserialised (larger files are hashed
#: in blocks and memory-mapped: one fresh buffer of 100 MB costs more in page faults than a second read)
READ_ONCE_MAX_BYTES = 32 << 20
#: the most a zoo download may send (``SCAN_ZOO_MAX_DOWNLOAD_BYTES`` overrides): far above any backbone's
#: weights, low enough that a server streaming without end fills no disk
MAX_DOWNLOAD_BYTES = 16 << 30
MAX_DOWNLOAD_ENV = "SCAN_ZOO_MAX_DOWNLOAD_BYTES"


def _file_key(path: str | Path) -> tuple:
    st = os.stat(path)
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def verify_sha256(path: str | Path, expected: str, what: str, read: bool = False) -> bytes | None:
    """Raise unless the file's sha256 is ``expected``; a file unchanged since this process checked it is not
    hashed again (loading the same weights twice costs one hash). With ``read``, a file that is hashed is
    read whole and its checked bytes are returned (None when it was not read)."""
    key = _file_key(path)
    if _VERIFIED.get(key) == expected:
        return None
    started_ns = time.time_ns()
    data = Path(path).read_bytes() if read else None
    actual = sha256_file(path) if data is None else hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise UserError(
            f"sha256 mismatch for {what} ({path}): expected {expected}, got {actual}. The file is not "
            "the one the zoo recorded (altered, truncated or replaced); delete it and download it again"
        )
    if key[5] < started_ns - VERIFIED_MIN_AGE_S * 1e9 and _file_key(path) == key:
        _VERIFIED[key] = actual
    return data


def check_filename(name: str) -> str:
    """A file name inside a repository: relative, no '..' component, no scheme, no backslash."""
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", name):
        raise UserError(f"refusing file name {name!r}: it must be a plain relative path inside the repository")
    return name


# ------------------------------------------------------------------------------------------ download
def weights_path(entry: ZooEntry, cache_dir: str | None = None) -> Path:
    """Local path of the entry's ``model.safetensors``: the shipped file, or a download at the pinned revision."""
    if entry.status == "shipped":
        return entry.weights_dir / WEIGHTS_NAME
    if entry.shipped:
        raise UserError(
            f"the weights of {entry.name} are missing from this installation of scan_zoo "
            f"({entry.weights_dir}); a checkout rebuilds them with `scan-zoo build-digits`"
        )
    if entry.status == "recipe":
        raise UserError(
            f"{entry.name} is a recipe: no weights have been published for it yet. Train it with "
            f"`{entry.recipe_command}`, or pick an entry with weights (scan-zoo list)"
        )
    return download_weights(entry, cache_dir)


def _printable(text) -> str:
    return "".join(c if c.isprintable() else "?" for c in str(text))


def download_weights(entry: ZooEntry, cache_dir: str | None = None) -> Path:
    """The entry's ``model.safetensors`` at the lock's commit id, in huggingface_hub's cache layout.

    The path is ``<cache>/models--ORG--NAME/snapshots/<revision>/model.safetensors`` (a link to
    ``blobs/<sha256>``), every part taken from the checked lock entry, so what huggingface_hub itself caches
    (and ``HF_HUB_OFFLINE=1``) is found and used. A download is hashed as it streams in and kept only if it
    has the lock's sha256; the server's headers (its commit id, ETag) name no file.
    """
    facts, where = entry.facts, f"the zoo's lock entry {entry.name!r}"
    repo_id = check_repo_id(facts.get("hf_hub_id"), where)
    revision = check_revision(facts.get("revision"), where)
    expected = check_sha256(facts.get("sha256"), where)
    storage = Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / revision / WEIGHTS_NAME
    if snapshot.is_file():
        return snapshot
    if constants.HF_HUB_OFFLINE:
        raise UserError(
            f"HF_HUB_OFFLINE is set and {entry.name} ({repo_id} at {revision}) is not in the cache "
            f"{storage}: unset HF_HUB_OFFLINE to download it"
        )
    blob = storage / "blobs" / expected
    if not blob.is_file():
        _fetch_blob(entry.name, repo_id, revision, expected, blob)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    tmp = snapshot.with_name(f".{WEIGHTS_NAME}.{os.getpid()}.tmp")
    try:
        os.symlink(os.path.relpath(blob, snapshot.parent), tmp)
    except OSError:  # no symlinks here (some Windows set-ups): a copy, as huggingface_hub does
        shutil.copyfile(blob, tmp)
    os.replace(tmp, snapshot)
    return snapshot


def _download_limit() -> int:
    value = os.environ.get(MAX_DOWNLOAD_ENV)
    if value is None:
        return MAX_DOWNLOAD_BYTES
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{MAX_DOWNLOAD_ENV} must be a positive number of bytes, not {value!r}")
    return int(value)


def _fetch_blob(name: str, repo_id: str, revision: str, expected: str, blob: Path) -> None:
    """GET ``repo_id``'s weights at ``revision`` into ``blob``, only if their sha256 is ``expected`` and they
    stay within the download limit (:data:`MAX_DOWNLOAD_BYTES`)."""
    url = hf_hub_url(repo_id, WEIGHTS_NAME, revision=revision)
    blob.parent.mkdir(parents=True, exist_ok=True)
    tmp = blob.with_name(f"{expected}.{os.getpid()}.incomplete")
    digest, limit, received = hashlib.sha256(), _download_limit(), 0

    def too_big(size: str) -> UserError:
        return UserError(
            f"the Hub sent {size} for {name} (from {_printable(url)}), more than the limit of {limit} "
            f"bytes ({MAX_DOWNLOAD_ENV}); nothing was kept in the cache"
        )

    try:
        with hub_call(
            f"downloading {name} ({repo_id} at {revision})",
            constants.ENDPOINT,
            after="nothing was written to the cache",
        ):
            with get_session().stream(
                "GET", url, headers=build_hf_headers(), follow_redirects=True, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
            ) as response:
                if response.status_code >= 400:
                    response.read()  # the error message is in the body
                hf_raise_for_status(response)
                announced = response.headers.get("content-length", "")
                if announced.isdigit() and int(announced) > limit:
                    raise too_big(f"a file of {announced} bytes")
                with open(tmp, "wb") as f:
                    for chunk in response.iter_bytes(1 << 20):
                        received += len(chunk)
                        if received > limit:
                            raise too_big(f"over {limit} bytes")
                        digest.update(chunk)
                        f.write(chunk)
        if digest.hexdigest() != expected:
            raise UserError(
                f"sha256 mismatch for {name} (downloaded from {_printable(url)}): expected {expected}, "
                f"got {digest.hexdigest()}. The Hub served a file other than the one the zoo recorded; "
                "nothing was kept in the cache"
            )
        os.replace(tmp, blob)
    finally:
        tmp.unlink(missing_ok=True)


def load_verified(entry: ZooEntry, cache_dir: str | None = None) -> dict:
    """The entry's backbone state dict, after its sha256 was checked against the lock file."""
    path = weights_path(entry, cache_dir)
    expected = entry.facts.get("sha256")
    if not expected:
        raise UserError(
            f"the zoo records no sha256 for {entry.name}: refusing to load unverified weights "
            "(the lock file zoo_lock.json lacks it)"
        )
    data = verify_sha256(path, expected, entry.name, read=path.stat().st_size <= READ_ONCE_MAX_BYTES)
    return read_safetensors(path, data)


# -------------------------------------------------------------------------------------------- export
def read_export_config(folder: Path) -> dict:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{folder} has no {CONFIG_NAME}: not an exported model")
    return read_json_object(path)


def export(run_dir: str | Path, name: str, out_dir: str | Path, results: dict | None = None) -> Path:
    """Make ``out_dir`` a zoo model folder from a training run directory (``model.safetensors`` + config there).

    ``name`` is the zoo name ``<arch>.<tag>``; a name the registry knows must match the run's architecture
    and method, and the entry's preprocessing is written into config.json. ``results`` (eval_linear.py's
    JSON) defaults to ``<run_dir>/eval_results.json``.
    """

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    src_cfg = read_export_config(run_dir)
    meta = src_cfg.get("scan_zoo", {})
    arch = src_cfg.get("architecture")
    entry = get_entry(name)
    if arch != entry.arch:
        raise UserError(f"{run_dir} holds a {arch}, but {name} is a {entry.arch}")
    if meta.get("method") not in (None, entry.method):
        raise UserError(
            f"{run_dir} was trained with --method {meta.get('method')}, but {name} is a {entry.method} entry"
        )
    weights = run_dir / WEIGHTS_NAME
    state = read_safetensors(weights)
    model = create_backbone(arch)
    load_strict(model, state, str(weights))  # exactly the backbone, nothing more or less
    if results is None and (run_dir / RESULTS_NAME).is_file():
        results = read_json_object(run_dir / RESULTS_NAME)

    out_dir.mkdir(parents=True, exist_ok=True)
    if weights.resolve() != (out_dir / WEIGHTS_NAME).resolve():
        shutil.copyfile(weights, out_dir / WEIGHTS_NAME)
    digest = sha256_file(out_dir / WEIGHTS_NAME)
    cfg = pretrained_cfg(entry).to_dict()
    model.pretrained_cfg = {k: v for k, v in cfg.items() if k not in ("file", "hf_hub_id", "hf_hub_filename")}
    scan_meta = {
        "name": name,
        "method": entry.method,
        "sha256": digest,
        "recipe": entry.recipe,
        "data": entry.data,
        "train": {k: meta[k] for k in ("steps", "epochs", "num_train_images", "config") if k in meta},
        "exported": date.today().isoformat(),
    }
    save_config_for_hf(
        model,
        str(out_dir / CONFIG_NAME),
        model_config={"scan_zoo": scan_meta},
        data_config=entry.preprocess.timm_fields(),
    )
    if results:
        (out_dir / RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / CARD_NAME).write_text(model_card(entry, results or {}, digest, scan_meta["train"]))
    return out_dir


def verify_export(folder: str | Path) -> dict:
    """Check that an export's files agree: weights match config.json's sha256 and load strictly into its arch."""
    folder = Path(folder)
    for f in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME):
        if not (folder / f).is_file():
            raise UserError(f"{folder} lacks {f}: make it with `scan-zoo export`")
    cfg = read_export_config(folder)
    meta = cfg.get("scan_zoo") or {}
    if not meta.get("sha256") or not meta.get("name"):
        raise UserError(f"{folder / CONFIG_NAME} has no scan_zoo name/sha256: make the folder with `scan-zoo export`")
    verify_sha256(folder / WEIGHTS_NAME, meta["sha256"], f"{meta['name']} export")
    model = create_backbone(cfg["architecture"])
    load_strict(model, read_safetensors(folder / WEIGHTS_NAME), str(folder / WEIGHTS_NAME))
    return cfg


# ------------------------------------------------------------------------------------------- publish
def publish(
    folder: str | Path,
    repo_id: str,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    record_lock: bool = True,
) -> dict:
    """Upload an exported folder to ``repo_id`` (created if needed); record revision and sha256 in the lock.

    Everything is checked before the first request: the repository id, a token (``HF_TOKEN`` or
    ``huggingface-cli login``), that the export's files agree and that the lock file is well formed. The token
    is never printed. The revision recorded is the commit id the server's reply names, and only if it is one
    (40 hex digits); a failed request, a malformed reply or any other revision is one error line and nothing is
    recorded. Only a zoo entry's export is recorded in the lock (a user's own ``ORG/MODEL`` export is uploaded,
    and the lock left alone). Returns ``{"repo_id", "revision", "commit_url", "sha256", "name"}``, and ``"lock"``
    when it was recorded.
    """
    check_repo_id(repo_id)
    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (nothing was uploaded)")
    cfg = verify_export(folder)
    meta = cfg["scan_zoo"]
    # The lock records the zoo's own entries; a user's export (ORG/MODEL) is published, never recorded there.
    record_lock = record_lock and any(e.name == meta["name"] for e in ENTRIES)
    if record_lock:
        read_lock(lock_path())  # a lock that cannot take the record is refused before anything is uploaded
    api = HfApi(endpoint=endpoint, token=token)
    with hub_call(
        f"upload of {meta['name']} to {repo_id}",
        endpoint or api.endpoint,
        token,
        after="nothing was recorded in the lock",
        replies=True,
    ):
        api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=f"scan_zoo: {meta['name']} (sha256 {meta['sha256'][:12]})",
            allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, RESULTS_NAME],
        )
    try:
        revision = check_revision(
            getattr(info, "oid", None), f"the Hub at {endpoint or api.endpoint} answered the upload to {repo_id}"
        )
    except UserError as e:
        raise UserError(
            f"{e}; nothing was recorded in the lock (check {repo_id} on the Hub: the upload may have landed)"
        ) from None
    out = {
        "name": meta["name"],
        "repo_id": repo_id,
        "revision": revision,
        "commit_url": _printable(getattr(info, "commit_url", "")),
        "sha256": meta["sha256"],
    }
    if record_lock:
        results_file = Path(folder) / RESULTS_NAME
        facts = {
            "hf_hub_id": repo_id,
            "revision": revision,
            "sha256": meta["sha256"],
            "published": date.today().isoformat(),
        }
        if results_file.is_file():
            facts["metrics"] = read_json_object(results_file)
        out["lock"] = str(record(meta["name"], facts))
    return out
