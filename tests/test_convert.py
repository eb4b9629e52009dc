"""Converters: official MoCo layouts in, detectron2 out, and no code ever unpickled."""

import pickle

import pytest
import timm
import torch
from safetensors.torch import load_file

from scan_zoo.common.errors import UserError
from scan_zoo.models.convert import read_checkpoint, to_detectron2, to_timm


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return timm.create_model("resnet50", num_classes=0).state_dict()


def official_moco_v2(backbone: dict) -> dict:
    """The exact key layout of facebookresearch/moco's main_moco.py checkpoint (MoCo v2, --mlp)."""
    sd = {}
    for enc in ("encoder_q", "encoder_k"):
        for k, v in backbone.items():
            sd[f"module.{enc}.{k}"] = v.clone()
        sd[f"module.{enc}.fc.0.weight"] = torch.randn(2048, 2048)
        sd[f"module.{enc}.fc.0.bias"] = torch.randn(2048)
        sd[f"module.{enc}.fc.2.weight"] = torch.randn(128, 2048)
        sd[f"module.{enc}.fc.2.bias"] = torch.randn(128)
    sd["module.queue"] = torch.randn(128, 65536)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 800, "arch": "resnet50", "state_dict": sd, "optimizer": {}}


def test_moco_v2_checkpoint_converts_and_loads_strictly(tmp_path, r50):
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save(official_moco_v2(r50), path)
    weights = to_timm(read_checkpoint(path), "resnet50")
    model = timm.create_model("resnet50", num_classes=0)
    model.load_state_dict(weights, strict=True)
    assert all(torch.equal(weights[k], r50[k]) for k in r50)  # the query encoder, not the key encoder


def test_moco_v3_layout(r50):
    sd = {f"module.base_encoder.{k}": v for k, v in r50.items()}
    sd.update(
        {
            "module.base_encoder.fc.0.weight": torch.randn(4096, 2048),
            "module.momentum_encoder.conv1.weight": torch.randn(64, 3, 7, 7),
            "module.predictor.0.weight": torch.randn(4096, 256),
        }
    )
    weights = to_timm(sd, "resnet50")
    assert weights.keys() == r50.keys()


def test_a_missing_key_is_named(tmp_path, r50):
    ckpt = official_moco_v2(r50)
    del ckpt["state_dict"]["module.encoder_q.layer3.2.bn2.running_var"]
    path = tmp_path / "broken.pth.tar"
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"missing keys \['layer3.2.bn2.running_var'\], unexpected keys none"):
        to_timm(read_checkpoint(path), "resnet50")


def test_a_pickle_carrying_code_is_refused(tmp_path, capfd):
    class Evil:
        def __reduce__(self):
            return (print, ("this would have run",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "x": Evil()}, f)
    with pytest.raises(UserError, match="refusing"):
        read_checkpoint(path)
    assert "this would have run" not in capfd.readouterr().out


def expected_detectron2_r50_keys() -> set:
    """detectron2's ResNet-50 parameter names, written out from its naming scheme (stem, res2-res5 with
    3/4/6/3 bottleneck blocks, convK.norm, shortcut on the first block of each stage)."""
    bn = ("weight", "bias", "running_mean", "running_var")
    keys = {"stem.conv1.weight"} | {f"stem.conv1.norm.{p}" for p in bn}
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        for b in range(blocks):
            for c in (1, 2, 3):
                keys.add(f"res{stage}.{b}.conv{c}.weight")
                keys |= {f"res{stage}.{b}.conv{c}.norm.{p}" for p in bn}
            if b == 0:
                keys.add(f"res{stage}.0.shortcut.weight")
                keys |= {f"res{stage}.0.shortcut.norm.{p}" for p in bn}
    return keys


def test_detectron2_export_has_exactly_detectron2_r50_names(r50):
    out = to_detectron2(r50)
    assert set(out["model"]) == expected_detectron2_r50_keys()
    assert out["matching_heuristics"] is True
    w = out["model"]["res3.0.shortcut.norm.running_var"]
    assert (w == r50["layer2.0.downsample.1.running_var"].numpy()).all()


def test_cli_convert_round_trip(tmp_path, r50):
    from scan_zoo.cli import main

    torch.save(official_moco_v2(r50), tmp_path / "ck.pth.tar")
    assert (
        main(["convert", "timm", str(tmp_path / "ck.pth.tar"), "--arch", "resnet50", "--out", str(tmp_path / "r50")])
        == 0
    )
    weights = load_file(str(tmp_path / "r50" / "model.safetensors"))
    assert all(torch.equal(weights[k], r50[k]) for k in r50)
    assert main(["convert", "detectron2", str(tmp_path / "r50"), "--out", str(tmp_path / "r50.pkl")]) == 0
    with open(tmp_path / "r50.pkl", "rb") as f:
        assert set(pickle.load(f)["model"]) == expected_detectron2_r50_keys()
