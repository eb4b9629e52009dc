"""The zoo's real Hub paths on 127.0.0.1: download at a pinned revision with sha256 checks (olah, a real Hub
mirror), plain timm `hf-hub:` loading, and `scan-zoo publish` (against HubWriteStandIn, a stand-in for the
Hub's write endpoints: olah has none)."""

import json

import pytest
import torch
from helpers import BIN, run_cli
from hubservers import HubWriteStandIn, OlahServer, make_digits_export, run_client

from scan_zoo.common.errors import UserError
from scan_zoo.common.files import sha256_file
from scan_zoo.zoo import registry
from scan_zoo.zoo.hub import export, publish

REPO = "scan-zoo/resnet50.scan_in1k"

LOAD_AND_COMPARE = """
    import json, sys, torch
    from safetensors.torch import load_file
    {imports}
    model = timm.create_model({name!r}, pretrained=True)
    ref = load_file({ref!r})
    own = model.state_dict()
    print(json.dumps({{"same_keys": sorted(own) == sorted(ref),
                       "identical": all(torch.equal(own[k], v) for k, v in ref.items()),
                       "num_classes": model.num_classes, "scan_zoo_imported": "scan_zoo" in sys.modules}}))
"""


def _export_run(tmp_path, arch, method, name, seed):
    from scan_zoo.models.backbones import (
        create_backbone,
        data_config_for,
        export_backbone,
    )

    torch.manual_seed(seed)
    run = tmp_path / f"run{seed}"
    export_backbone(
        create_backbone(arch),
        run,
        data_config_for(224, 256, registry.IMAGENET_MEAN, registry.IMAGENET_STD),
        {"method": method, "steps": 1, "epochs": 1, "num_train_images": 1},
    )
    return export(run, name, tmp_path / f"export{seed}")


@pytest.fixture(scope="module")
def published_resnet50(tmp_path_factory):
    """resnet50.scan_in1k exported twice (two seeds) and committed to an olah mirror one after the other;
    a lock file pins the FIRST commit."""
    tmp = tmp_path_factory.mktemp("zoo_hub")
    first = _export_run(tmp, "resnet50", "scan", "resnet50.scan_in1k", seed=1)
    second = _export_run(tmp, "resnet50", "scan", "resnet50.scan_in1k", seed=2)
    files = ("model.safetensors", "config.json", "README.md")
    with OlahServer(tmp / "olah") as olah:
        rev1 = olah.add_model_repo(REPO, {f: first / f for f in files})
        olah.add_model_repo(REPO, {f: second / f for f in files})  # main moves on; the lock stays pinned
        lock = tmp / "zoo_lock.json"
        registry.record(
            "resnet50.scan_in1k",
            {"hf_hub_id": REPO, "revision": rev1, "sha256": sha256_file(first / "model.safetensors")},
            lock,
        )
        yield {"olah": olah, "first": first, "second": second, "lock": lock, "tmp": tmp}


def _env(pub, tmp_path, lock=None):
    env = pub["olah"].client_env(tmp_path / "hf_home")  # a fresh cache for every test
    env["SCAN_ZOO_LOCK"] = str(lock or pub["lock"])
    return env


def test_zoo_tag_downloads_the_pinned_revision_bit_identical(published_resnet50, tmp_path):
    pub = published_resnet50
    got = run_client(
        LOAD_AND_COMPARE.format(
            imports="import scan_zoo, timm", name="resnet50.scan_in1k", ref=str(pub["first"] / "model.safetensors")
        ),
        _env(pub, tmp_path),
    )
    assert got == {"same_keys": True, "identical": True, "num_classes": 0, "scan_zoo_imported": True}


def test_plain_timm_hf_hub_name_loads_without_scan_zoo(published_resnet50, tmp_path):
    pub = published_resnet50
    got = run_client(
        LOAD_AND_COMPARE.format(
            imports="import timm", name=f"hf-hub:{REPO}", ref=str(pub["second"] / "model.safetensors")
        ),
        _env(pub, tmp_path),
    )
    assert got == {"same_keys": True, "identical": True, "num_classes": 0, "scan_zoo_imported": False}


def test_a_download_that_does_not_match_the_recorded_sha256_is_refused(published_resnet50, tmp_path):
    pub = published_resnet50
    lock = tmp_path / "lock.json"
    facts = json.loads(pub["lock"].read_text())["resnet50.scan_in1k"]
    registry.record(
        "resnet50.scan_in1k", {**facts, "sha256": sha256_file(pub["second"] / "model.safetensors")}, lock
    )  # the lock expects the second file; the pinned commit serves the first
    code = """
        import json, scan_zoo, timm
        try:
            timm.create_model("resnet50.scan_in1k", pretrained=True)
            print(json.dumps({"error": None}))
        except scan_zoo.UserError as e:
            print(json.dumps({"error": str(e)}))
    """
    err = run_client(code, _env(pub, tmp_path, lock))["error"]
    assert err and "sha256 mismatch for resnet50.scan_in1k" in err
    assert f"expected {sha256_file(pub['second'] / 'model.safetensors')}" in err
    assert f"got {sha256_file(pub['first'] / 'model.safetensors')}" in err


# ------------------------------------------------------------------------------------------- publish
TOKEN = "hf_test_token_do_not_print_0123456789"


@pytest.fixture
def digits_export(tmp_path):
    return make_digits_export(tmp_path, {"cached": {"top1": 50.0, "top5": 90.0}})


def test_publish_uploads_the_export_and_records_revision_and_sha256(digits_export, tmp_path, monkeypatch):
    lock = tmp_path / "lock.json"
    monkeypatch.setenv("SCAN_ZOO_LOCK", str(lock))
    with HubWriteStandIn(token=TOKEN) as hub:
        r = publish(digits_export, "scan-zoo/test_resnet.moco_digits", token=TOKEN, endpoint=hub.endpoint)
        files = hub.repos["scan-zoo/test_resnet.moco_digits"]
        assert not hub.unexpected()
        assert r["revision"] == hub.commits[-1]["oid"]
    for f in ("model.safetensors", "config.json", "README.md", "eval_results.json"):
        assert files[f] == (digits_export / f).read_bytes(), f
    facts = json.loads(lock.read_text())["test_resnet.moco_digits"]
    assert facts["hf_hub_id"] == "scan-zoo/test_resnet.moco_digits" and facts["revision"] == r["revision"]
    assert facts["sha256"] == sha256_file(digits_export / "model.safetensors")
    assert facts["metrics"]["cached"]["top1"] == 50.0


def test_publish_without_a_token_fails_before_any_request(digits_export, tmp_path):
    with HubWriteStandIn() as hub:
        env = hub.client_env(tmp_path / "hf_home")  # no HF_TOKEN, an empty HF_HOME: no stored login either
        env["SCAN_ZOO_LOCK"] = str(tmp_path / "lock.json")
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
        assert p.returncode == 2 and "no Hugging Face token" in p.stderr, p.stderr
        assert hub.requests == []
    assert not (tmp_path / "lock.json").exists()


def test_publish_refuses_an_export_whose_files_disagree_before_any_request(digits_export):
    with open(digits_export / "model.safetensors", "ab") as f:
        f.write(b"\0")  # the weights no longer match config.json's sha256
    with HubWriteStandIn(token=TOKEN) as hub:
        with pytest.raises(UserError, match="sha256 mismatch"):
            publish(digits_export, "scan-zoo/x", token=TOKEN, endpoint=hub.endpoint, record_lock=False)
        assert hub.requests == []


def test_the_token_never_appears_in_output_or_errors(digits_export, tmp_path):
    with HubWriteStandIn(token="hf_the_right_token") as hub:  # our token is refused: 401
        env = hub.client_env(tmp_path / "hf_home")
        env.update(HF_TOKEN=TOKEN, SCAN_ZOO_LOCK=str(tmp_path / "lock.json"))
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
        assert p.returncode == 2 and "failed" in p.stderr, p.stderr
        assert TOKEN not in p.stdout + p.stderr
    with HubWriteStandIn(token=TOKEN) as hub:
        env = hub.client_env(tmp_path / "hf_home2")
        env.update(HF_TOKEN=TOKEN, SCAN_ZOO_LOCK=str(tmp_path / "lock.json"))
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
        assert p.returncode == 0, p.stderr
        assert hub.received_tokens and set(hub.received_tokens) == {TOKEN}
        assert TOKEN not in p.stdout + p.stderr and "published test_resnet.moco_digits" in p.stdout
    lock_text = (tmp_path / "lock.json").read_text()
    assert TOKEN not in lock_text and TOKEN not in (digits_export / "README.md").read_text()


def test_publish_refuses_path_tricks_in_the_repo_id(digits_export):
    with pytest.raises(UserError, match="not a Hub repository id"):
        publish(digits_export, "../../etc", token=TOKEN, endpoint="http://127.0.0.1:9")
