"""The weights shipped inside the package: present, verified, documented, loadable offline and via torch.hub."""

import json
import shutil

import pytest
import torch
from helpers import ROOT
from hubservers import run_client
from safetensors.torch import load_file

from scan_zoo.common.files import sha256_file
from scan_zoo.eval import probe
from scan_zoo.zoo import registry
from scan_zoo.zoo.cards import headline

SHIPPED = [e for e in registry.ENTRIES if e.shipped]


@pytest.mark.parametrize("entry", SHIPPED, ids=lambda e: e.name)
def test_shipped_entry_is_complete_and_recorded(entry):
    folder = entry.weights_dir
    assert entry.status == "shipped", f"{entry.name}: run `scan-zoo build-digits`"
    assert entry.facts["sha256"] == sha256_file(folder / "model.safetensors")
    results = json.loads((folder / "eval_results.json").read_text())
    cached = results["cached"]
    assert cached["protocol"]["name"] == "cached" and cached["protocol"]["epochs"] == 100
    assert 0 <= cached["top1"] <= 100 and 0 <= cached["knn"]["top1"] <= 100
    assert cached["train_images"] == 5752 and cached["weights_sha256"] == entry.facts["sha256"]
    card = (folder / "README.md").read_text()
    assert "Van Gansbeke" in card and entry.name in card and entry.facts["sha256"] in card
    assert f"{cached['top1']:.2f}" in card  # the card's numbers are the evaluation's
    assert f"val: {cached['protocol']['eval_transform']}" in card  # with the transform they were measured on
    default = probe.resolve_config(
        probe.ProbeConfig(), {"image_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}, "digits"
    )
    assert cached["protocol"]["eval_transform"] == probe.protocol_settings(default)["eval_transform"], (
        "shipped results were measured with another validation transform than eval_linear.py's default: "
        "re-evaluate with `scan-zoo build-digits`"
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == entry.arch and config["scan_zoo"]["sha256"] == entry.facts["sha256"]
    linear, knn = headline(results)
    assert f"| {linear} | {knn} |" in (ROOT / "README.md").read_text()


def test_shipped_weights_load_offline_in_a_fresh_process(tmp_path):
    """No network: HF_HUB_OFFLINE, an empty cache and a closed endpoint; the weights come from the package."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT="http://127.0.0.1:9")
    code = f"""
        import json, torch, timm, scan_zoo
        from safetensors.torch import load_file
        out = {{}}
        for name in {[e.name for e in SHIPPED]!r}:
            model = timm.create_model(name, pretrained=True).eval()
            ref = load_file(str(scan_zoo.get_entry(name).weights_dir / "model.safetensors"))
            own = model.state_dict()
            feats = timm.create_model(name, pretrained=True, features_only=True).eval()(torch.zeros(2, 3, 32, 32))
            out[name] = {{"identical": sorted(own) == sorted(ref) and all(torch.equal(own[k], v) for k, v in ref.items()),
                         "pooled": list(model(torch.zeros(2, 3, 32, 32)).shape),
                         "maps": [list(f.shape) for f in feats]}}
        print(json.dumps(out))
    """
    got = run_client(code, env)
    for name, r in got.items():
        assert r["identical"], name
        assert r["pooled"][0] == 2 and len(r["pooled"]) == 2
        sides = [m[-1] for m in r["maps"]]
        assert len(sides) >= 4 and sides == sorted(sides, reverse=True) and sides[0] > sides[-1], r["maps"]


def test_torch_hub_local_create_model_and_entry_points():
    entry = SHIPPED[0]
    model = torch.hub.load(str(ROOT), "create_model", entry.name, source="local", trust_repo=True)
    ref = load_file(str(entry.weights_dir / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())
    hubconf = _import_hubconf()  # what torch.hub.list / help read (they take GitHub repositories only)
    names = [n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")]
    assert "create_model" in names
    assert {e.name.replace(".", "_") for e in registry.ENTRIES if e.has_weights} <= set(names)
    assert not {e.name.replace(".", "_") for e in registry.ENTRIES if not e.has_weights} & set(names)
    fn_doc = getattr(hubconf, entry.name.replace(".", "_")).__doc__
    linear, _ = headline(entry.metrics)
    assert linear.split()[0] in fn_doc  # the headline metric is in the docstring
    named = torch.hub.load(str(ROOT), entry.name.replace(".", "_"), source="local", trust_repo=True)
    assert all(torch.equal(named.state_dict()[k], v) for k, v in ref.items())


def _import_hubconf():
    import importlib.util

    spec = importlib.util.spec_from_file_location("scan_zoo_hubconf", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hubconf_works_without_the_package_installed(tmp_path):
    """A copy of the checkout, with the installed (editable) scan_zoo hidden: hubconf imports the copy's."""
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "scan_zoo", checkout / "scan_zoo", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "hubconf.py", checkout / "hubconf.py")
    code = f"""
        import json, sys
        sys.meta_path[:] = [f for f in sys.meta_path  # the editable install's finder (a class or an instance)
                            if "editable" not in str(getattr(f, "__module__", "") or type(f).__module__).lower()]
        sys.path[:] = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
        import torch
        model = torch.hub.load({str(checkout)!r}, "create_model", {SHIPPED[0].name!r}, source="local", trust_repo=True)
        import scan_zoo
        print(json.dumps({{"from": scan_zoo.__file__, "features": model.num_features}}))
    """
    import os

    got = run_client(code, {**os.environ, "PYTHONPATH": ""}, timeout=180)
    assert got["from"].startswith(str(checkout)) and got["features"] > 0


def test_torch_hub_create_model_names_an_unknown_entry():
    with pytest.raises(Exception, match="not in the zoo"):
        torch.hub.load(str(ROOT), "create_model", "resnet50.not_a_tag", source="local", trust_repo=True)


@pytest.mark.parametrize("entry", SHIPPED, ids=lambda e: e.name)
def test_timm_transform_of_a_shipped_entry_is_the_one_its_numbers_were_measured_with(entry):
    """The card, config.json and timm's transform (crop_pct) say what eval_results.json's protocol did."""
    import re

    import numpy as np
    import timm
    from PIL import Image

    from scan_zoo.data import datasets as data_lib

    protocol = json.loads((entry.weights_dir / "eval_results.json").read_text())["cached"]["protocol"]
    resize, crop = map(
        int, re.fullmatch(r"Resize\((\d+)\) \+ CenterCrop\((\d+)\)", protocol["eval_transform"]).groups()
    )
    model = timm.create_model(entry.name, pretrained=False)
    tf = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    measured = data_lib.eval_transform(crop, resize, entry.preprocess.mean, entry.preprocess.std)
    rng = np.random.default_rng(0)
    for size in ((32, 32), (40, 50), (64, 33)):  # the digit scenes' size and others
        img = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        torch.testing.assert_close(tf(img), measured(img), rtol=0, atol=1e-6)
    card = (entry.weights_dir / "README.md").read_text()
    assert f"resize to {resize} px, {crop} px centre crop" in card
