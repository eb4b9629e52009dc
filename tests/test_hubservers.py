"""The loopback Hub servers of hubservers.py work with the real huggingface_hub and timm clients.

Client code runs in a subprocess: huggingface_hub reads HF_ENDPOINT (and HF_HUB_DISABLE_XET) at import time.
Nothing here can reach the internet; a request that escaped the loopback servers would fail.
"""

import json

import pytest
import torch
from hubservers import HubWriteStandIn, OlahServer, http_request, run_client
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def olah(tmp_path_factory):
    # started before any test repo exists: every repo below is added to a running server
    with OlahServer(tmp_path_factory.mktemp("olah")) as server:
        yield server


def test_olah_hf_hub_download_main_and_pinned_commit(olah, tmp_path):
    weights_v1 = tmp_path / "v1.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(weights_v1))
    old = olah.add_model_repo("acme/pinning", {"config.json": b'{"v": 1}', "model.safetensors": weights_v1})
    new = olah.add_model_repo("acme/pinning", {"config.json": b'{"v": 2}'})
    assert old != new

    got = run_client(
        f"""
        import json
        from huggingface_hub import hf_hub_download, model_info
        names, revs = ("config.json", "model.safetensors"), ("main", "{old}")
        out = {{rev: {{f: hf_hub_download("acme/pinning", f, revision=rev) for f in names}} for rev in revs}}
        out["sha"] = model_info("acme/pinning", revision="main").sha  # offline olah needs an explicit revision
        print(json.dumps(out))
    """,
        olah.client_env(tmp_path / "hf_home"),
    )

    assert got["sha"] == new
    assert open(got["main"]["config.json"], "rb").read() == b'{"v": 2}'
    assert open(got[old]["config.json"], "rb").read() == b'{"v": 1}'
    for rev in ("main", old):  # unchanged file: same bytes at both commits
        assert open(got[rev]["model.safetensors"], "rb").read() == weights_v1.read_bytes()
    # the files came through olah into the fresh HF_HOME
    assert got["main"]["config.json"].startswith(str(tmp_path / "hf_home"))
    # olah opens the mirror per request: a commit made after it served main is served at once
    olah.add_model_repo("acme/pinning", {"config.json": b'{"v": 3}'})
    assert http_request(f"{olah.endpoint}/acme/pinning/resolve/main/config.json", timeout=10) == (200, b'{"v": 3}')


def test_olah_timm_pretrained_hf_hub_bit_identical(olah, tmp_path):
    import timm
    from timm.models._hub import save_config_for_hf

    torch.manual_seed(1234)
    model = timm.create_model("test_resnet", num_classes=0)
    with torch.no_grad():  # make every tensor (buffers included) differ from a fresh init
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t))
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    config = tmp_path / "config.json"
    save_config_for_hf(
        model,
        str(config),
        model_config={"scan_zoo": {"method": "test"}},
        data_config={"input_size": (3, 32, 32), "crop_pct": 1.0},
    )
    olah.add_model_repo("acme/test-resnet-scan", {"model.safetensors": weights, "config.json": config})

    loaded = tmp_path / "loaded.safetensors"
    got = run_client(
        f"""
        import json, timm
        from safetensors.torch import save_file
        m = timm.create_model("hf-hub:acme/test-resnet-scan", pretrained=True)
        save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, {str(loaded)!r})
        print(json.dumps({{"num_classes": m.num_classes, "hf_hub_id": m.pretrained_cfg.get("hf_hub_id"),
                          "input_size": list(m.pretrained_cfg["input_size"])}}))
    """,
        olah.client_env(tmp_path / "hf_home"),
    )

    assert got == {"num_classes": 0, "hf_hub_id": "acme/test-resnet-scan", "input_size": [3, 32, 32]}
    expected, actual = load_file(str(weights)), load_file(str(loaded))
    assert expected.keys() == actual.keys() and len(expected) > 10
    for k in expected:
        assert torch.equal(expected[k], actual[k]), k


# "0": hf_xet installed and enabled -> upload_folder takes the pipelined (xet-capable) path;
# "1": HF_HUB_DISABLE_XET -> the classic create_commit path. Both only see "regular" files from the stand-in.
@pytest.mark.parametrize("disable_xet", ["0", "1"])
def test_stand_in_create_repo_and_upload_folder(tmp_path, disable_xet):
    folder = tmp_path / "export"
    (folder / "sub").mkdir(parents=True)
    files = {
        "config.json": json.dumps({"architecture": "resnet50", "scan_zoo": {"method": "scan"}}).encode(),
        "README.md": b"---\nlicense: apache-2.0\nlibrary_name: timm\n---\n# model card\n",
        "sub/weights.bin": bytes(range(256)) * 8192,  # 2 MiB, every byte value
    }
    for rel, data in files.items():
        (folder / rel).write_bytes(data)

    with HubWriteStandIn(token="hf_loopback_token") as hub:
        env = hub.client_env(tmp_path / "hf_home")
        env["HF_HUB_DISABLE_XET"] = disable_xet
        got = run_client(
            f"""
            import json
            from huggingface_hub import HfApi
            from huggingface_hub.utils._runtime import is_xet_available
            api = HfApi(endpoint={hub.endpoint!r}, token="hf_loopback_token")
            url = api.create_repo("acme/uploaded", exist_ok=True, repo_type="model")
            api.create_repo("acme/uploaded", exist_ok=True, repo_type="model")  # exists: 409, accepted
            info = api.upload_folder(folder_path={str(folder)!r}, repo_id="acme/uploaded", commit_message="export")
            # nothing changed: the client sees the remote oids from preupload, skips the commit, asks for the head
            again = api.upload_folder(folder_path={str(folder)!r}, repo_id="acme/uploaded", commit_message="again")
            print(json.dumps({{"repo_id": url.repo_id, "oid": info.oid, "commit_url": info.commit_url,
                              "again": again.oid, "xet": is_xet_available()}}))
        """,
            env,
        )

    assert hub.unexpected() == [], hub.unexpected()
    assert got["xet"] is (disable_xet == "0")  # both upload paths of huggingface_hub are exercised
    assert hub.created == ["acme/uploaded"] and got["repo_id"] == "acme/uploaded"
    assert hub.repos == {"acme/uploaded": files}
    assert [(c["message"], c["files"]) for c in hub.commits] == [("export", files)]
    assert got["oid"] == got["again"] == hub.commits[0]["oid"] and len(got["oid"]) == 40
    assert got["commit_url"].endswith("/acme/uploaded/commit/" + got["oid"])
    assert all(r["authorization"] for r in hub.requests)
    assert set(hub.received_tokens) == {"hf_loopback_token"}
    # upload_folder checks README.md metadata while listing the folder, create_commit checks it again
    yaml = [("POST", "/api/validate-yaml", 200)] * (2 if disable_xet == "1" else 1)
    upload = [("POST", "/api/models/acme/uploaded/preupload/main", 200)]
    calls = [(r["method"], r["path"], r["status"]) for r in hub.requests]
    assert calls == [
        ("POST", "/api/repos/create", 200),
        ("POST", "/api/repos/create", 409),
        *yaml,
        *upload,
        ("POST", "/api/models/acme/uploaded/commit/main", 200),
        *yaml,
        *upload,
        ("GET", "/api/models/acme/uploaded/revision/main", 200),
    ]


def test_stand_in_refuses_what_it_does_not_know():
    with HubWriteStandIn() as hub:

        def status(path, data=None, headers=None):
            return http_request(hub.endpoint + path, timeout=10, data=data, headers=headers)

        code, body = status("/api/models/acme/x/lfs/batch", data=b"{}", headers={"Authorization": "Bearer t"})
        assert code == 501 and b"/api/models/acme/x/lfs/batch" in body
        # a write without a token is refused like on the Hub
        assert status("/api/repos/create", data=b'{"name": "x", "organization": "acme"}')[0] == 401
        # commit to a repo that was never created
        assert status("/api/models/acme/x/commit/main", data=b"", headers={"Authorization": "Bearer t"})[0] == 404
    assert [r["status"] for r in hub.requests] == [501, 401, 404]
    assert [r["path"] for r in hub.unexpected()] == ["/api/models/acme/x/lfs/batch"]
    assert hub.received_tokens == ["t", "t"] and hub.created == []
