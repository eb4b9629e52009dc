"""The Hub as an adversary: lying replies, failing connections and malformed lock entries.

Servers listen on 127.0.0.1 only. Each case runs the real code path (``scan-zoo`` in a subprocess, or its
``main`` in-process where only huggingface_hub's endpoint constant has to point at the server) and checks the
exit status, that the error is one line, that the lock file is unchanged and that nothing was written
outside the Hub cache.
"""

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import BIN, make_image_folder, run_cli
from hubservers import LOOPBACK, HubWriteStandIn, client_env, free_port, make_digits_export, run_client

from scan_zoo import cli
from scan_zoo.common.errors import UserError
from scan_zoo.zoo import registry

TOKEN = "hf_hostile_test_token_0123456789abcdef"
GOOD_REV = "0123456789abcdef0123456789abcdef01234567"
ENTRY, REPO = "resnet18.scan_in1k", "scan-zoo/resnet18.scan_in1k"
ESCAPE = "../../../../../../escaped"  # what a lying server names: a path above any cache
BAD_REVISIONS = ["../../..", "main", "abc1234", GOOD_REV.upper(), GOOD_REV + "0", "refs/pr/1", None, 7]


# ------------------------------------------------------------------------------------------- helpers
def tree(root: Path) -> set:
    """Every path under ``root`` (files, folders, links), relative."""
    return {p.relative_to(root) for p in root.rglob("*")}


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def write_lock(path: Path, facts: dict) -> bytes:
    """A lock holding the shipped entries plus ``ENTRY: facts``; returns its bytes."""
    lock = json.loads(registry.lock_path().read_text()) if registry.lock_path().is_file() else {}
    lock[ENTRY] = facts
    path.write_text(json.dumps(lock, indent=2))
    return path.read_bytes()


class LyingResolveServer:
    """Answers every file request with ``body`` (or ``status``), naming a hostile commit and ETag in its headers:
    what a compromised mirror or a man in the middle could say. Records every request path."""

    def __init__(self, body: bytes = b"", status: int = 200, content_length: bool = True):
        self.body, self.status, self.paths, self.content_length = body, status, [], content_length

    def __enter__(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.paths.append(self.path)
                body = server.body if server.status == 200 else b'{"error": "internal"}'
                self.send_response(server.status)
                if server.content_length:
                    self.send_header("Content-Length", str(len(body)))
                else:  # the body ends when the connection closes
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.send_header("X-Repo-Commit", ESCAPE)
                self.send_header("ETag", f'"{ESCAPE}-etag"')
                self.send_header("X-Linked-Etag", f'"{ESCAPE}-etag"')
                if server.content_length:
                    self.send_header("X-Linked-Size", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_HEAD = do_GET

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.endpoint = f"http://{LOOPBACK}:{self._server.server_address[1]}"
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


class FailingHub(HubWriteStandIn):
    """The write stand-in, failing one way after the repository was created:

    ``oid``: the commit succeeds but the reply names ``oid`` as its commit id (``None``: names none);
    ``500``: the commit (files sent) is answered 500, with ``Retry-After: 0`` so the client's retries are quick;
    ``drop``: the connection is closed without an answer on the first request after the repository was created.
    """

    def __init__(self, mode: str, oid: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.mode, self.oid = mode, oid

    def _handle(self, h):
        if self.mode == "drop" and self.created and not h.path.startswith("/api/repos/create"):
            self.requests.append(
                {"method": h.command, "path": h.path, "status": "dropped", "authorization": True, "query": ""}
            )
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        return super()._handle(h)

    def _route(self, method, path, query, body, auth):
        if self.mode == "500" and path.endswith("/commit/main"):
            return 500, {"error": "internal error"}, {"Retry-After": "0"}
        return super()._route(method, path, query, body, auth)

    def _commit(self, repo_type, repo_id, body):
        answer = super()._commit(repo_type, repo_id, body)
        if self.mode == "oid" and answer is not None:
            status, payload, headers = answer
            payload = {**payload, "commitOid": self.oid, "commitUrl": f"{self.endpoint}/{repo_id}/commit/{self.oid}"}
            if self.oid is None:
                del payload["commitOid"]
            answer = status, payload, headers
        return answer


@pytest.fixture
def digits_export(tmp_path):
    return make_digits_export(tmp_path)


@pytest.fixture
def user_lock(tmp_path, monkeypatch):
    lock = tmp_path / "lock.json"
    before = write_lock(lock, {"note": "kept"})
    monkeypatch.setenv("SCAN_ZOO_LOCK", str(lock))
    return lock, before


def _publish_in_process(hub, folder, capsys, monkeypatch):
    """``scan-zoo publish`` through its ``main``; huggingface_hub's endpoint constant points at ``hub``."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code = cli.main(
        ["publish", str(folder), "--repo-id", "scan-zoo/test_resnet.moco_digits", "--endpoint", hub.endpoint]
    )
    return code, capsys.readouterr()


# ------------------------------------------------------------------------------------------- publish
def test_publish_refuses_a_reply_naming_a_path_as_its_revision(digits_export, tmp_path, user_lock):
    lock, before = user_lock
    outside = tree(tmp_path.parent)
    with FailingHub("oid", oid="../../..", token=TOKEN) as hub:
        env = hub.client_env(tmp_path / "hf_home")
        env.update(HF_TOKEN=TOKEN, SCAN_ZOO_LOCK=str(lock))
        p = run_cli(
            [
                str(BIN / "scan-zoo"),
                "publish",
                str(digits_export),
                "--repo-id",
                "scan-zoo/x",
                "--endpoint",
                hub.endpoint,
            ],
            env=env,
        )
    line = one_line(p.stderr)
    assert p.returncode == 2 and "'../../..' is not a commit id" in line and "nothing was recorded" in line, p.stderr
    assert lock.read_bytes() == before
    new = {p for p in tree(tmp_path.parent) - outside if not str(p).startswith(tmp_path.name + "/hf_home")}
    assert new == set(), new


@pytest.mark.parametrize("oid", [r for r in BAD_REVISIONS if r is not None and not isinstance(r, int)])
def test_publish_records_only_a_commit_id(oid, digits_export, user_lock, capsys, monkeypatch):
    lock, before = user_lock
    with FailingHub("oid", oid=oid, token=TOKEN) as hub:
        code, out = _publish_in_process(hub, digits_export, capsys, monkeypatch)
        assert hub.commits  # the server took the upload; its reply is what lies
    line = one_line(out.err)
    assert code == 2 and f"{oid!r} is not a commit id" in line and "nothing was recorded in the lock" in line
    assert lock.read_bytes() == before


def test_publish_refuses_a_reply_without_a_commit_id(digits_export, user_lock, capsys, monkeypatch):
    lock, before = user_lock
    with FailingHub("oid", oid=None, token=TOKEN) as hub:
        code, out = _publish_in_process(hub, digits_export, capsys, monkeypatch)
    line = one_line(out.err)
    assert code == 2 and "reply is malformed" in line and "nothing was recorded in the lock" in line, out.err
    assert lock.read_bytes() == before


def test_publish_records_a_valid_commit_id(digits_export, user_lock, capsys, monkeypatch):
    lock, _ = user_lock
    with FailingHub("oid", oid=GOOD_REV, token=TOKEN) as hub:
        code, out = _publish_in_process(hub, digits_export, capsys, monkeypatch)
    assert code == 0, out.err
    facts = json.loads(lock.read_text())
    assert facts["test_resnet.moco_digits"]["revision"] == GOOD_REV and facts[ENTRY] == {"note": "kept"}


def test_publish_to_a_closed_port_is_one_line_naming_the_endpoint(digits_export, tmp_path, user_lock):
    lock, before = user_lock
    endpoint = f"http://{LOOPBACK}:{free_port()}"
    env = client_env(endpoint, tmp_path / "hf_home")
    env.update(HF_TOKEN=TOKEN, SCAN_ZOO_LOCK=str(lock))
    p = run_cli(
        [str(BIN / "scan-zoo"), "publish", str(digits_export), "--repo-id", "scan-zoo/x", "--endpoint", endpoint],
        env=env,
    )
    line = one_line(p.stderr)
    assert p.returncode == 2 and endpoint in line and "ConnectError" in line, p.stderr
    assert "nothing was recorded in the lock" in line and lock.read_bytes() == before


@pytest.mark.parametrize("mode", ["500", "drop"])
def test_an_upload_failing_half_way_records_nothing(mode, digits_export, user_lock, capsys, monkeypatch):
    lock, before = user_lock
    with FailingHub(mode, token=TOKEN) as hub:
        code, out = _publish_in_process(hub, digits_export, capsys, monkeypatch)
        assert hub.created == ["scan-zoo/test_resnet.moco_digits"] and not hub.commits  # failed after it began
        endpoint = hub.endpoint
    line = one_line(out.err)
    assert code == 2 and endpoint in line and "nothing was recorded in the lock" in line, out.err
    assert ("HTTP 500" if mode == "500" else "RemoteProtocolError") in line
    assert "Retrying" not in out.err and TOKEN not in out.err + out.out
    assert lock.read_bytes() == before


# ------------------------------------------------------------------------------------------- the lock
@pytest.mark.parametrize(
    "field,value",
    [("revision", r) for r in BAD_REVISIONS]
    + [("sha256", "abc"), ("sha256", "../x"), ("hf_hub_id", "../../etc"), ("hf_hub_id", "a/b/c")],
)
def test_a_lock_entry_with_a_bad_field_is_one_line_naming_file_and_entry(field, value, user_lock, capsys):
    lock, _ = user_lock
    facts = {"hf_hub_id": REPO, "revision": GOOD_REV, "sha256": "0" * 64, field: value}
    before = write_lock(lock, facts)
    assert cli.main(["list"]) == 2
    line = one_line(capsys.readouterr().err)
    assert str(lock) in line and repr(ENTRY) in line and field in line, line
    with pytest.raises(UserError, match=re.escape(str(lock))):
        _ = registry.get_entry(ENTRY).facts
    assert lock.read_bytes() == before


def test_record_refuses_a_bad_revision_and_leaves_the_lock(tmp_path):
    lock = tmp_path / "lock.json"
    registry.record(ENTRY, {"hf_hub_id": REPO, "revision": GOOD_REV}, lock)
    before = lock.read_bytes()
    for bad in ("../../..", "main", "abc1234"):
        with pytest.raises(UserError, match="is not a commit id"):
            registry.record(ENTRY, {"revision": bad}, lock)
    assert lock.read_bytes() == before and not lock.with_suffix(".tmp").exists()


def test_a_bad_lock_entry_stops_a_download_before_any_request(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4, size=8, val_per_class=1)
    lock = tmp_path / "lock.json"
    before = write_lock(lock, {"hf_hub_id": REPO, "revision": "../../..", "sha256": "0" * 64})
    with LyingResolveServer(b"x") as server:
        env = client_env(server.endpoint, tmp_path / "hf_home")
        env["SCAN_ZOO_LOCK"] = str(lock)
        p = run_cli(
            [
                str(BIN / "scan-zoo"),
                "mine",
                "--model",
                ENTRY,
                "--data",
                str(data),
                "--out",
                str(tmp_path / "nn.safetensors"),
                "--num-workers",
                "0",
            ],
            env=env,
        )
        assert server.paths == []
    line = one_line(p.stderr)
    assert p.returncode == 2 and str(lock) in line and "'../../..' is not a commit id" in line, p.stderr
    assert lock.read_bytes() == before and not (tmp_path / "hf_home").exists()


# ------------------------------------------------------------------------------------------- downloads
def _mine_env(tmp_path, endpoint, sha256):
    lock = tmp_path / "lock.json"
    write_lock(lock, {"hf_hub_id": REPO, "revision": GOOD_REV, "sha256": sha256})
    env = client_env(endpoint, tmp_path / "hf_home")
    env["SCAN_ZOO_LOCK"] = str(lock)
    return env


def test_a_download_whose_bytes_differ_from_the_lock_is_refused_and_not_cached(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4, size=8, val_per_class=1)
    served = b"not the weights the zoo recorded"
    expected = hashlib.sha256(b"the weights the zoo recorded").hexdigest()
    with LyingResolveServer(served) as server:
        env = _mine_env(tmp_path, server.endpoint, expected)
        outside = tree(tmp_path.parent)
        p = run_cli(
            [
                str(BIN / "scan-zoo"),
                "mine",
                "--model",
                ENTRY,
                "--data",
                str(data),
                "--out",
                str(tmp_path / "nn.safetensors"),
                "--num-workers",
                "0",
            ],
            env=env,
        )
        assert server.paths == [f"/{REPO}/resolve/{GOOD_REV}/model.safetensors"]  # the lock's commit, by id
    line = one_line(p.stderr)
    assert p.returncode == 2 and f"sha256 mismatch for {ENTRY}" in line, p.stderr
    assert f"expected {expected}" in line and f"got {hashlib.sha256(served).hexdigest()}" in line
    cache = tmp_path / "hf_home"
    assert not [f for f in cache.rglob("*") if f.is_file()]  # the wrong bytes are nowhere in the cache
    new = {p for p in tree(tmp_path.parent) - outside if not str(p).startswith(tmp_path.name + "/hf_home")}
    assert not new, new
    assert not any("escaped" in str(p) for p in tree(cache))


def test_hostile_headers_name_no_file_and_the_weights_load(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "weights.safetensors"
    torch.manual_seed(3)
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(weights))
    body = weights.read_bytes()
    with LyingResolveServer(body) as server:
        env = _mine_env(tmp_path, server.endpoint, hashlib.sha256(body).hexdigest())
        outside = tree(tmp_path.parent)
        got = run_client(
            f"""
            import json, scan_zoo, timm, torch
            from safetensors.torch import load_file
            model = timm.create_model({ENTRY!r}, pretrained=True)
            ref = load_file({str(weights)!r})
            print(json.dumps(all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())))
        """,
            env,
        )
    assert got is True
    cache = tmp_path / "hf_home"
    storage = Path("hub") / ("models--" + REPO.replace("/", "--"))
    assert tree(cache) == {
        Path("hub"),
        storage,
        storage / "blobs",
        storage / "snapshots",
        storage / "blobs" / hashlib.sha256(body).hexdigest(),
        storage / "snapshots" / GOOD_REV,
        storage / "snapshots" / GOOD_REV / "model.safetensors",
    }
    new = {p for p in tree(tmp_path.parent) - outside if not str(p).startswith(tmp_path.name + "/hf_home")}
    assert not new, new


@pytest.mark.parametrize("status", ["closed", 500])
def test_a_failing_download_is_one_line_naming_the_endpoint(status, tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4, size=8, val_per_class=1)
    if status == "closed":
        endpoint = f"http://{LOOPBACK}:{free_port()}"
        p = run_cli(
            [
                str(BIN / "scan-zoo"),
                "mine",
                "--model",
                ENTRY,
                "--data",
                str(data),
                "--out",
                str(tmp_path / "nn.safetensors"),
                "--num-workers",
                "0",
            ],
            env=_mine_env(tmp_path, endpoint, "0" * 64),
        )
    else:
        with LyingResolveServer(status=500) as server:
            endpoint = server.endpoint
            p = run_cli(
                [
                    str(BIN / "scan-zoo"),
                    "mine",
                    "--model",
                    ENTRY,
                    "--data",
                    str(data),
                    "--out",
                    str(tmp_path / "nn.safetensors"),
                    "--num-workers",
                    "0",
                ],
                env=_mine_env(tmp_path, endpoint, "0" * 64),
            )
    line = one_line(p.stderr)
    assert p.returncode == 2 and endpoint in line and ENTRY in line, p.stderr
    assert ("ConnectError" if status == "closed" else "HTTP 500") in line
    assert not [f for f in (tmp_path / "hf_home").rglob("*") if f.is_file()]


@pytest.mark.parametrize("announce", [True, False], ids=["content-length", "unannounced"])
def test_a_download_over_the_size_limit_is_cut_off_and_not_cached(announce, tmp_path, monkeypatch):
    """A server that sends more than the download limit (here lowered to 1 KiB) is cut off, whether it says
    so in Content-Length or just keeps streaming; nothing is cached."""
    from huggingface_hub import constants

    from scan_zoo.zoo import hub, registry

    served = b"x" * 4096
    lock = tmp_path / "lock.json"
    write_lock(lock, {"hf_hub_id": REPO, "revision": GOOD_REV, "sha256": hashlib.sha256(served).hexdigest()})
    monkeypatch.setenv("SCAN_ZOO_LOCK", str(lock))
    monkeypatch.setenv(hub.MAX_DOWNLOAD_ENV, "1024")
    with LyingResolveServer(served, content_length=announce) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        with pytest.raises(UserError, match="more than the limit of 1024 bytes") as e:
            hub.weights_path(registry.get_entry(ENTRY), cache_dir=str(tmp_path / "cache"))
    assert "nothing was kept in the cache" in str(e.value)
    assert not [f for f in (tmp_path / "cache").rglob("*") if f.is_file()]


def test_a_bad_download_limit_is_one_line(tmp_path, monkeypatch):
    from scan_zoo.zoo import hub

    monkeypatch.setenv(hub.MAX_DOWNLOAD_ENV, "-5")
    with pytest.raises(UserError, match="must be a positive number of bytes"):
        hub._download_limit()
