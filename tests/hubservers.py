"""Loopback servers standing in for the Hugging Face Hub, so tests can drive the real download and upload code of
huggingface_hub and timm without any network access. Everything listens on 127.0.0.1 only.

* ``OlahServer``: the READ side. Runs olah (an MIT-licensed Hub mirror, ``olah-cli``) in offline mirror mode on
  git repos that the test writes under ``<root>/mirrors/models/<org>/<name>``. olah opens the mirror folder on
  every request (``olah.server_mirror.load_local_mirror_payload`` builds a fresh ``LocalMirrorRepo`` each call,
  and offline mode skips every upstream check), so repos and commits added after the server started are served
  at once; nothing has to exist before start.
* ``HubWriteStandIn``: the WRITE side (olah has no upload endpoints). A small threaded ``http.server`` that answers
  the calls huggingface_hub 2.x makes for ``HfApi.create_repo(..., exist_ok=True)`` followed by
  ``HfApi.upload_folder(...)``/``create_commit(...)``. It is NOT a Hub implementation: it answers ``preupload``
  with ``uploadMode: "regular"`` for every file, so the client sends every file base64-encoded inline in the
  commit's NDJSON payload and never starts an LFS or Xet transfer (the real Hub would say "lfs" for large or
  binary files; those transfers are therefore not exercised). Any request it does not understand is answered
  501 (path in the body) and recorded, so tests can assert that nothing unexpected was asked.
  Xet: huggingface_hub 2.4 chooses Xet on the client side only (``hf_xet`` importable and HF_HUB_DISABLE_XET not
  set); no server header turns it off. With hf_xet, ``upload_folder`` runs the pipelined uploader
  (``_upload_pipeline.py``), without it the classic ``create_commit``; both make the same three calls here
  (create, preupload, commit) because every file is "regular". Had the stand-in answered "lfs", the client would
  ask ``GET /api/models/<repo>/xet-write-token/main`` (hf_xet) or ``POST /<repo>.git/info/lfs/objects/batch``
  (HF_HUB_DISABLE_XET=1).

Clients must run with the endpoint in their environment before huggingface_hub/timm are imported (they read
``HF_ENDPOINT`` at import time), so tests run client code in a subprocess with ``client_env(...)``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

LOOPBACK = "127.0.0.1"

# Variables that would send a client elsewhere, authenticate it, or make it refuse loopback (HF_HUB_OFFLINE blocks
# every request, loopback included) or share a cache with other runs.
_CLIENT_ENV_DROP = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_XET_CACHE",
    "HF_ASSETS_CACHE",
    "TRANSFORMERS_CACHE",
    "HF_ENDPOINT",
    "HF_HOME",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


def client_env(endpoint: str, hf_home: str | os.PathLike) -> dict:
    """``os.environ`` copy for a client subprocess talking to ``endpoint``: HF_ENDPOINT set, a fresh HF_HOME (so no
    stored token and an empty cache), no token/offline/proxy variables, telemetry off."""
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_ENV_DROP}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY=LOOPBACK + ",localhost",
        no_proxy=LOOPBACK + ",localhost",
        PYTHONUNBUFFERED="1",
    )
    return env


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (for servers that must be told their port up front)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def http_request(
    url: str, timeout: float = 10, data: bytes | None = None, headers: dict | None = None
) -> tuple[int, bytes]:
    """GET (POST if ``data``) straight to ``url``, ignoring proxy settings; returns (status, body), raising only
    for connection errors."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, data=data, headers=headers or {}), timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _git(cwd: Path, *args: str) -> str:
    """git with a fixed identity and no global/system config (no signing, hooks or templates of the user). GIT_*
    variables are dropped: under a git hook GIT_DIR/GIT_INDEX_FILE would point at the project's own repository."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    out = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
        cwd=cwd,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as the oid of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class OlahServer:
    """olah in offline mirror mode on 127.0.0.1, serving model repos created with ``add_model_repo``.

    Use as a context manager (or call ``start()``/``stop()``); ``stop()`` always kills the process.
    ``root`` holds the mirrors, olah's config, cache and logs; a temporary folder (removed on stop) if None.
    """

    # A tiny repo created at start under a unique name: the readiness probe asks for its refs, which proves that OUR
    # olah listens (not another server that got the same port) and reads our mirrors folder (GET / answers 500 in
    # olah 0.5.4, so it is no probe).
    PROBE_ORG = "olah-probe"

    def __init__(self, root: str | os.PathLike | None = None, start_timeout: float = 30.0):
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="olah-")) if root is None else Path(root)
        self.mirrors = self.root / "mirrors"
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._lock = threading.Lock()
        self.probe_repo = f"{self.PROBE_ORG}/ready-{uuid.uuid4().hex[:12]}"

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("OlahServer not started")
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "olah.out"

    def start(self) -> "OlahServer":
        self.mirrors.mkdir(parents=True, exist_ok=True)
        self.add_model_repo(self.probe_repo, {"README.md": b"readiness probe\n"})
        # olah must be told its port in the toml, so another process can take it between free_port() and olah's
        # bind: then olah exits with "address already in use" and we try another port
        for attempt in range(3):
            self._launch(free_port())
            try:
                self._wait_ready()
                return self
            except BaseException as e:
                if attempt == 2 or "address already in use" not in str(e):
                    self.stop()
                    raise
                self._stop_process()
        raise AssertionError("unreachable")

    def _launch(self, port: int) -> None:
        self.port = port
        netloc = f"{LOOPBACK}:{port}"
        toml = self.root / "olah.toml"
        toml.write_text(
            "[basic]\n"
            f'host = "{LOOPBACK}"\n'
            f"port = {port}\n"
            f"repos-path = {json.dumps(str(self.root / 'repos'))}\n"
            'mirror-scheme = "http"\n'
            f'mirror-netloc = "{netloc}"\n'
            f'mirror-lfs-netloc = "{netloc}"\n'
            f"mirrors-path = [{json.dumps(str(self.mirrors))}]\n"
            # offline mode never contacts upstream; point upstream at a closed loopback port all the same
            'hf-scheme = "http"\n'
            f'hf-netloc = "{LOOPBACK}:9"\n'
            f'hf-lfs-netloc = "{LOOPBACK}:9"\n'
            "[accessibility]\n"
            "offline = true\n"
        )
        olah_cli = Path(sys.executable).with_name("olah-cli")
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(olah_cli), "-c", str(toml), "--log-path", str(self.root / "logs")],
            cwd=self.root,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k not in _CLIENT_ENV_DROP},
        )
        # backstop: kill olah even if nobody calls stop() (e.g. an exception between start() and the with-block)
        weakref.finalize(self, _kill, self.proc)

    def _wait_ready(self) -> None:
        url = f"{self.endpoint}/api/models/{self.probe_repo}/refs"
        deadline = time.monotonic() + self.start_timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"olah exited with {self.proc.returncode}:\n{self._log_text()}")
            try:
                status, body = http_request(url, timeout=2)
                if status == 200 and b"branches" in body:
                    return
                last = f"HTTP {status}: {body[:300]!r}"
            except OSError as e:  # not listening yet
                last = repr(e)
            time.sleep(0.1)
        raise RuntimeError(f"olah not ready after {self.start_timeout}s ({last}):\n{self._log_text()}")

    def _stop_process(self) -> None:
        if self.proc is not None:
            _kill(self.proc)
            self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill olah (always safe to call, also twice); removes ``root`` if it was a temporary folder."""
        self._stop_process()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "OlahServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_model_repo(self, repo_id: str, files: dict[str, bytes | os.PathLike]) -> str:
        """Commit ``files`` (path in repo -> bytes or a local file to copy) to branch main of model repo
        ``repo_id`` ("org/name"), creating the repo if needed; returns the new commit sha.

        A later call for the same repo adds a commit on top (files not named are kept, like a Hub upload), so tests
        can pin the older sha. Files are plain git blobs (no LFS); olah reads a whole file into memory per GET.
        Works before or after start().
        """
        org, _, name = repo_id.partition("/")
        if not org or not name or "/" in name:
            raise ValueError(f"repo_id must be 'org/name', got {repo_id!r}")
        repo = self.mirrors / "models" / org / name
        with self._lock:
            if not (repo / ".git").exists():
                repo.mkdir(parents=True, exist_ok=True)
                _git(repo, "init", "-q", "-b", "main")
            for rel, content in files.items():
                dst = repo / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, (bytes, bytearray)):
                    dst.write_bytes(content)
                else:
                    shutil.copyfile(content, dst)
            _git(repo, "add", "-A")
            _git(repo, "commit", "-q", "--allow-empty", "-m", f"add {', '.join(sorted(files))}")
            return _git(repo, "rev-parse", "HEAD")

    def client_env(self, hf_home: str | os.PathLike) -> dict:
        """Environment for a client subprocess reading from this mirror (see module-level ``client_env``)."""
        return client_env(self.endpoint, hf_home)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class HubWriteStandIn:
    """Loopback stand-in for the Hub's WRITE endpoints (see module docstring). Not a Hub: state is in memory,
    one branch (main), regular files only.

    Answers:
      POST /api/repos/create                        create a repo (409 if it exists; the client's exist_ok accepts)
      POST /api/{models|datasets|spaces}/{org}/{name}/preupload/main   every file -> uploadMode "regular"
      POST /api/{...}/{org}/{name}/commit/main      NDJSON: header, file (base64), deletedFile/deletedFolder
      GET  /api/{...}/{org}/{name}/revision/main    repo info; the client asks only when a commit would be empty
      POST /api/validate-yaml                       README.md metadata check (upload_folder and create_commit); valid
    All but validate-yaml need an ``Authorization: Bearer`` header (401 otherwise), and that token if ``token`` is
    given.
    Anything else: 501 with the path in the body.

    State (read it after the client finished): ``repos`` repo_id -> {path: bytes} at the last commit;
    ``commits`` list of {repo_id, oid, message, files} (files = what that commit added); ``created`` repo ids
    in creation order; ``requests`` list of {method, path, query, authorization (bool), status};
    ``received_tokens`` the bearer tokens seen, in order.
    """

    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, dict[str, bytes]] = {}
        self.repo_types: dict[str, str] = {}
        self.heads: dict[str, str] = {}
        self.commits: list[dict] = []
        self.created: list[str] = []
        self.requests: list[dict] = []
        self.received_tokens: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("HubWriteStandIn not started")
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def unexpected(self) -> list[dict]:
        """Requests answered 501 (not understood)."""
        return [r for r in self.requests if r["status"] == 501]

    def client_env(self, hf_home: str | os.PathLike) -> dict:
        return client_env(self.endpoint, hf_home)

    def start(self) -> "HubWriteStandIn":
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer carries Content-Length

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                stand_in._handle(self)

            do_POST = do_PUT = do_HEAD = do_DELETE = do_PATCH = do_GET

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-write-stand-in", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "HubWriteStandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- request handling

    _REPO_ROUTE = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)/(preupload|commit|revision)/(.+)$")

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        body = _read_body(h)
        auth = h.headers.get("Authorization")
        record = {"method": h.command, "path": url.path, "query": url.query, "authorization": auth is not None}
        if auth is not None:
            with self._lock:
                self.received_tokens.append(auth.removeprefix("Bearer ").strip())
        try:
            status, payload, headers = self._route(h.command, url.path, url.query, body, auth)
        except Exception as e:  # a bug here must not look like a network error to the client
            status, payload, headers = 500, {"error": f"stand-in failed: {e!r}"}, {}
        record["status"] = status
        with self._lock:
            self.requests.append(record)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json" if not isinstance(payload, bytes) else "text/plain")
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _route(self, method, path, query, body, auth):
        def not_understood():
            return 501, f"hub write stand-in does not implement {method} {path}?{query}".encode(), {}

        if method == "POST" and path == "/api/validate-yaml" and not query:
            return 200, {"errors": [], "warnings": []}, {}
        if method == "POST" and path == "/api/repos/create" and not query:
            return self._checked_auth(auth) or self._create_repo(json.loads(body))
        m = self._REPO_ROUTE.match(path)
        # one branch only; query parameters such as create_pr=1 are not implemented
        if not m or m.group(4) != "main" or query:
            return not_understood()
        repo_type, repo_id, action = m.group(1)[:-1], m.group(2), m.group(3)
        if (method, action) not in (("POST", "preupload"), ("POST", "commit"), ("GET", "revision")):
            return not_understood()
        denied = self._checked_auth(auth)
        if denied:
            return denied
        with self._lock:
            if self.repo_types.get(repo_id) != repo_type:
                return 404, {"error": f"Repository not found: {repo_id}"}, {"X-Error-Code": "RepoNotFound"}
            if action == "preupload":
                files = self.repos[repo_id]
                return (
                    200,
                    {
                        "files": [
                            {
                                "path": f["path"],
                                "uploadMode": "regular",
                                "shouldIgnore": False,
                                "oid": git_blob_sha(files[f["path"]]) if f["path"] in files else None,
                            }
                            for f in json.loads(body)["files"]
                        ]
                    },
                    {},
                )
            if action == "revision":
                return (
                    200,
                    {
                        "id": repo_id,
                        "sha": self.heads.get(repo_id),
                        "siblings": [{"rfilename": p} for p in sorted(self.repos[repo_id])],
                    },
                    {},
                )
            return self._commit(repo_type, repo_id, body) or not_understood()

    def _checked_auth(self, auth):
        token = auth.removeprefix("Bearer ").strip() if auth else ""
        if not token or (self.token is not None and token != self.token):
            return 401, {"error": "Invalid credentials in Authorization header"}, {}
        return None

    def _create_repo(self, payload: dict):
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.endpoint}/{prefix}{repo_id}"
        with self._lock:
            if repo_id in self.repo_types:
                return 409, {"error": "You already created this model repo", "url": url}, {}
            self.repo_types[repo_id] = repo_type
            self.repos[repo_id] = {}
            self.created.append(repo_id)
        return 200, {"url": url, "name": repo_id}, {}

    def _commit(self, repo_type: str, repo_id: str, body: bytes):
        """Apply an NDJSON commit (caller holds the lock). Returns None for anything not understood."""
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return None
        header = lines[0]["value"]
        head = self.heads.get(repo_id)
        if header.get("parentCommit") not in (None, head):
            return 412, {"error": "A commit has happened since. Please refresh and try again."}, {}
        tree = dict(self.repos[repo_id])
        added: dict[str, bytes] = {}
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file" and value.get("encoding") == "base64":
                added[value["path"]] = tree[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                tree = {p: d for p, d in tree.items() if not p.startswith(folder)}
            else:  # lfsFile (we never ask for LFS), copies, unknown keys
                return None
        digest = hashlib.sha1(repr((repo_id, head, header.get("summary"), len(self.commits))).encode())
        for p in sorted(tree):
            digest.update(p.encode() + b"\0" + git_blob_sha(tree[p]).encode())
        oid = digest.hexdigest()
        self.repos[repo_id] = tree
        self.heads[repo_id] = oid
        self.commits.append({"repo_id": repo_id, "oid": oid, "message": header.get("summary"), "files": added})
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return (
            200,
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self.endpoint}/{prefix}{repo_id}/commit/{oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
            {},
        )


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(h.rfile.read(size))
            h.rfile.readline()  # CRLF after each chunk
    return h.rfile.read(int(h.headers.get("Content-Length") or 0))


def run_client(code: str, env: dict, timeout: float = 120) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON object as its last stdout line."""
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, f"client failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_digits_export(tmp_path: Path, results: dict | None = None) -> Path:
    """A folder ``scan-zoo publish`` accepts: a random test_resnet exported as ``test_resnet.moco_digits``
    (with ``eval_results.json`` when ``results`` is given)."""
    from scan_zoo.models.backbones import create_backbone, data_config_for, export_backbone
    from scan_zoo.zoo import registry
    from scan_zoo.zoo.hub import export

    run = tmp_path / "run"
    export_backbone(
        create_backbone("test_resnet"),
        run,
        data_config_for(32, 32, registry.IMAGENET_MEAN, registry.IMAGENET_STD),
        {"method": "moco", "steps": 1, "epochs": 1, "num_train_images": 1},
    )
    if results is not None:
        (run / "eval_results.json").write_text(json.dumps(results))
    return export(run, "test_resnet.moco_digits", tmp_path / "export")
