"""Hostile files given to the real commands: each is refused in one line naming the file, exit status 2.

Weights (zero-byte, truncated, random bytes, integer tensors), ``config.json`` that is not a JSON object, a
``.pth`` zip that inflates far past its size, neighbour tables that SCAN's mining cannot have written, an
impossible K, and a ViT at an image size it cannot take. Commands run in-process through their ``main``
(fast) for every case, and as subprocesses for one case each, so the exit status and stderr are the real ones.
"""

from __future__ import annotations

import importlib.util
import io
import shutil
import zipfile

import pytest
import torch
from helpers import BIN, PYTHON, ROOT, make_image_folder, run_cli
from safetensors.torch import save_file

from scan_zoo.cli import main as scan_zoo_main
from scan_zoo.common.errors import UserError


def _eval_linear_main(argv):
    spec = importlib.util.spec_from_file_location("eval_linear", ROOT / "eval_linear.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _train_main(argv):
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def one_error_line(code: int, err: str, prog: str, *needles) -> str:
    """Exit 2, no traceback, and one ``<prog>: error:`` line holding every needle; returns that line."""
    assert code == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "data")  # 3 classes x 16 train images, 16 px


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    """An export of a random-init test_resnet: model.safetensors + config.json, as a run leaves them."""
    from scan_zoo.models.backbones import (
        create_backbone,
        data_config_for,
        export_backbone,
    )

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("good") / "model"
    export_backbone(
        create_backbone("test_resnet"), out, data_config_for(16, 16, (0.5,) * 3, (0.5,) * 3), {"method": "scan"}
    )
    return out


def _int64_weights(good) -> bytes:
    from safetensors.torch import load_file, save

    return save({k: v.round().long() for k, v in load_file(str(good / "model.safetensors")).items()})


#: hostile model.safetensors contents, and what the error line must say
BAD_WEIGHTS = {
    "zero-byte": (lambda good: b"", "empty (0 bytes)"),
    "truncated": (lambda good: (good / "model.safetensors").read_bytes()[:-1000], "not a readable safetensors"),
    "random": (lambda good: bytes(range(256)) * 4, "not a readable safetensors"),
    "int64": (_int64_weights, "not floating point"),
}


@pytest.fixture(params=sorted(BAD_WEIGHTS))
def bad_weights(request, good_model, tmp_path):
    """A copy of the good export whose model.safetensors is hostile; yields (folder, expected words)."""
    make, needle = BAD_WEIGHTS[request.param]
    folder = tmp_path / f"bad_{request.param}"
    shutil.copytree(good_model, folder)
    (folder / "model.safetensors").write_bytes(make(good_model))
    return folder, needle


@pytest.fixture(params=["list", "not-json"])
def bad_config(request, good_model, tmp_path):
    """A copy of the good export whose config.json is not a JSON object."""
    text, needle = {
        "list": ('["test_resnet"]', "JSON list, not an object"),
        "not-json": ('{"architecture": "test_resnet",', "not valid JSON"),
    }[request.param]
    folder = tmp_path / f"cfg_{request.param}"
    shutil.copytree(good_model, folder)
    (folder / "config.json").write_text(text)
    return folder, needle


def _model_commands(folder, data, out):
    """Every command that reads a model folder: (prog, main, argv)."""
    common = ["--data", str(data), "--image-size", "16", "--num-workers", "0"]
    return [
        (
            "eval_linear.py",
            _eval_linear_main,
            [
                str(folder),
                *common,
                "--no-progress",
                "--epochs",
                "1",
                "--out",
                str(out / "eval.json"),
                "--cache-dir",
                str(out / "cache"),
            ],
        ),
        ("scan-zoo", scan_zoo_main, ["mine", "--model", str(folder), *common, "--out", str(out / "nb.safetensors")]),
        (
            "scan-zoo",
            scan_zoo_main,
            ["mine", "--model", f"local-dir:{folder}", *common, "--out", str(out / "nb.safetensors")],
        ),
        (
            "scan-zoo",
            scan_zoo_main,
            ["export", str(folder), "--name", "test_resnet.scan_digits", "--out", str(out / "export")],
        ),
    ]


def test_hostile_weights_are_one_line_in_every_command(bad_weights, data, tmp_path, capsys):
    folder, needle = bad_weights
    out = tmp_path / "out"
    commands = _model_commands(folder, data, out)
    if "int64" not in folder.name:  # converters check dtypes against a model: the int64 .pth case below
        commands += [
            ("scan-zoo", scan_zoo_main, ["convert", "detectron2", str(folder), "--out", str(out / "d2.pkl")]),
            (
                "scan-zoo",
                scan_zoo_main,
                [
                    "convert",
                    "timm",
                    str(folder / "model.safetensors"),
                    "--arch",
                    "test_resnet",
                    "--out",
                    str(out / "timm"),
                ],
            ),
        ]
    for prog, main, argv in commands:
        code = main(argv)
        line = one_error_line(code, capsys.readouterr().err, prog, needle)
        assert "model.safetensors" in line, line
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), list(out.rglob("*"))


def test_config_json_not_an_object_is_one_line_in_every_command(bad_config, data, tmp_path, capsys):
    folder, needle = bad_config
    out = tmp_path / "out"
    for prog, main, argv in _model_commands(folder, data, out):
        code = main(argv)
        line = one_error_line(code, capsys.readouterr().err, prog, needle)
        assert "config.json" in line, line
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_corrupt_weights_through_the_real_scripts(good_model, data, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(good_model, folder)
    (folder / "model.safetensors").write_bytes(b"")
    p = run_cli(
        [
            PYTHON,
            "eval_linear.py",
            str(folder),
            "--data",
            str(data),
            "--no-progress",
            "--out",
            str(tmp_path / "eval.json"),
        ]
    )
    one_error_line(p.returncode, p.stderr, "eval_linear.py", "model.safetensors", "empty")
    p = run_cli(
        [
            str(BIN / "scan-zoo"),
            "mine",
            "--model",
            f"local-dir:{folder}",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "nb.safetensors"),
            "--image-size",
            "16",
            "--num-workers",
            "0",
        ]
    )
    one_error_line(p.returncode, p.stderr, "scan-zoo", "model.safetensors", "empty")
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "nb.safetensors").exists()


# --------------------------------------------------------------------------------------------- .pth
def _moco_state(int64: bool = False) -> dict:
    from scan_zoo.models.backbones import create_backbone

    state = {f"module.encoder_q.{k}": v for k, v in create_backbone("test_resnet").state_dict().items()}
    return {k: (v.round().long() if int64 else v) for k, v in state.items()}


@pytest.fixture
def zip_bomb(tmp_path):
    """A torch.save archive of 40 MB of zeros, re-zipped with deflate: ~40 KB that inflates ~1000x."""
    buf = io.BytesIO()
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(10_000_000)}}, buf)
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert path.stat().st_size < 200_000
    return path


def test_a_pth_that_inflates_is_refused_before_it_is_loaded(zip_bomb, monkeypatch):
    from scan_zoo.common import readers

    def never(*a, **k):
        raise AssertionError("torch.load was called on the zip bomb")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(UserError, match="inflate"):
        readers.read_pth(zip_bomb)


def test_a_pth_that_inflates_is_one_line_in_convert(zip_bomb, tmp_path):
    p = run_cli(
        [
            str(BIN / "scan-zoo"),
            "convert",
            "timm",
            str(zip_bomb),
            "--arch",
            "test_resnet",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    one_error_line(p.returncode, p.stderr, "scan-zoo", "bomb.pth", "inflate")
    assert not (tmp_path / "out").exists()


def test_a_pth_as_torch_save_writes_it_is_read(tmp_path):
    from scan_zoo.common.readers import read_pth

    torch.save({"state_dict": _moco_state()}, tmp_path / "ok.pth")
    assert set(read_pth(tmp_path / "ok.pth")["state_dict"]) == set(_moco_state())


@pytest.mark.parametrize("kind", ["zero-byte", "truncated", "random", "int64"])
def test_hostile_pth_is_one_line_in_convert(kind, tmp_path, capsys):
    path = tmp_path / "ckpt.pth.tar"
    torch.save({"state_dict": _moco_state(int64=kind == "int64")}, path)
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "random":
        path.write_bytes(bytes(range(256)) * 64)
    code = scan_zoo_main(["convert", "timm", str(path), "--arch", "test_resnet", "--out", str(tmp_path / "out")])
    needles = {
        "zero-byte": ["ckpt.pth.tar", "empty (0 bytes)"],
        "int64": ["not floating point", "conv1.0.weight", "ckpt.pth.tar"],
        "truncated": ["ckpt.pth.tar"],
        "random": ["ckpt.pth.tar"],
    }[kind]
    one_error_line(code, capsys.readouterr().err, "scan-zoo", *needles)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ neighbour tables
@pytest.fixture(scope="module")
def table(data, tmp_path_factory):
    """A genuine K=2 table of the data set (as `scan-zoo mine` writes it) and the train split's labels."""
    from scan_zoo.core.neighbors import mine_neighbors
    from scan_zoo.data import datasets as data_lib
    from scan_zoo.data.neighbor_table import dataset_provenance

    base = data_lib.image_folder(data, "train")
    labels = torch.as_tensor(base.targets)
    idx, sims = mine_neighbors(torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(0)), labels, 2)
    return idx, sims, dataset_provenance(base, 2, "m"), labels


def _hostile_table(kind, table):
    idx, sims, _, labels = table
    idx, sims = idx.clone(), sims.clone()
    if kind == "out-of-range":
        idx[5, 0] = len(labels) + 3
    elif kind == "negative":
        idx[5, 0] = -7
    elif kind == "cross-class":
        idx[5, 0] = int((labels != labels[5]).nonzero()[0])
    elif kind == "self":
        idx[5, 0] = 5
    elif kind == "float":
        idx = idx.float()
    elif kind == "rows":
        idx, sims = idx[:-1], sims[:-1]
    return idx, sims


TABLE_NEEDLES = {
    "out-of-range": "outside 0..47",
    "negative": "outside 0..47",
    "cross-class": "of class",
    "self": "its own neighbour",
    "float": "integer",
    "rows": "47 rows",
}


@pytest.mark.parametrize("kind", sorted(TABLE_NEEDLES))
def test_a_hostile_neighbour_table_is_refused_on_load(kind, table, tmp_path):
    from scan_zoo.data.neighbor_table import load_neighbors, save_neighbors

    idx, sims = _hostile_table(kind, table)
    path = save_neighbors(tmp_path / "nb.safetensors", idx, sims, table[2])
    with pytest.raises(UserError, match=TABLE_NEEDLES[kind]) as e:
        load_neighbors(path, labels=table[3])
    assert str(path) in str(e.value)


def test_the_genuine_table_loads(table, tmp_path):
    from scan_zoo.data.neighbor_table import load_neighbors, save_neighbors

    path = save_neighbors(tmp_path / "nb.safetensors", table[0], table[1], table[2])
    assert torch.equal(load_neighbors(path, labels=table[3])[0], table[0])


@pytest.mark.parametrize("kind", ["out-of-range", "cross-class"])
def test_train_refuses_a_hostile_table_before_training(kind, table, data, tmp_path, capsys):
    from scan_zoo.data.neighbor_table import save_neighbors

    idx, sims = _hostile_table(kind, table)
    path = save_neighbors(tmp_path / "nb.safetensors", idx, sims, table[2])
    run = tmp_path / "run"
    code = _train_main(
        [
            "--method",
            "scan",
            "--init-from",
            "none",
            "--neighbors",
            str(path),
            "--data",
            str(data),
            "--k",
            "2",
            "--image-size",
            "16",
            "--max-steps",
            "1",
            "--num-workers",
            "0",
            "--output-dir",
            str(run),
        ]
    )
    one_error_line(code, capsys.readouterr().err, "train.py", TABLE_NEEDLES[kind], "nb.safetensors")
    assert not (run / "checkpoints").exists() and not (run / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------- K
@pytest.mark.parametrize("k, needle", [(-1, "must be >= 0"), (16, "largest class"), (100, "largest class")])
def test_mine_refuses_an_impossible_k(k, needle, good_model, data, tmp_path, capsys):
    code = scan_zoo_main(
        [
            "mine",
            "--model",
            str(good_model),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "nb.safetensors"),
            "--k",
            str(k),
            "--image-size",
            "16",
            "--num-workers",
            "0",
        ]
    )
    one_error_line(code, capsys.readouterr().err, "scan-zoo", needle)
    assert not (tmp_path / "nb.safetensors").exists()


def test_mine_k_minus_one_is_refused_before_the_digits_are_rendered(tmp_path, capsys):
    code = scan_zoo_main(
        [
            "mine",
            "--model",
            "test_resnet",
            "--k",
            "-1",
            "--data-cache",
            str(tmp_path / "digits"),
            "--out",
            str(tmp_path / "nb.safetensors"),
        ]
    )
    one_error_line(code, capsys.readouterr().err, "scan-zoo", "--k", "supcon")
    assert not (tmp_path / "digits").exists() and not (tmp_path / "nb.safetensors").exists()


# ------------------------------------------------------------------------------------ ViT image size
@pytest.fixture(scope="module")
def vit_model(tmp_path_factory):
    from scan_zoo.models.backbones import (
        create_backbone,
        data_config_for,
        export_backbone,
    )

    out = tmp_path_factory.mktemp("vit") / "vit"
    export_backbone(
        create_backbone("vit_tiny_patch16_224"),
        out,
        data_config_for(224, None, (0.5,) * 3, (0.5,) * 3),
        {"method": "moco"},
    )
    return out


def test_a_vit_at_an_image_size_it_cannot_take_is_one_line(vit_model, data, tmp_path, capsys):
    common = ["--data", str(data), "--image-size", "32", "--num-workers", "0"]
    code = _eval_linear_main(
        [
            str(vit_model),
            *common,
            "--no-progress",
            "--out",
            str(tmp_path / "e.json"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    one_error_line(code, capsys.readouterr().err, "eval_linear.py", "224x224", "32x32")
    code = scan_zoo_main(["mine", "--model", str(vit_model), *common, "--out", str(tmp_path / "nb.safetensors")])
    one_error_line(code, capsys.readouterr().err, "scan-zoo", "224x224", "--image-size 224")
    code = _train_main(
        [
            "--method",
            "moco",
            "--model",
            "vit_tiny_patch16_224",
            *common,
            "--max-steps",
            "1",
            "--batch-size",
            "8",
            "--queue-size",
            "16",
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    one_error_line(code, capsys.readouterr().err, "train.py", "vit_tiny_patch16_224", "224x224")
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "nb.safetensors").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_vit_at_its_own_size_passes_the_check():
    from scan_zoo.models.backbones import check_input_size, create_backbone

    check_input_size(create_backbone("vit_tiny_patch16_224"), 224, "vit")
    dynamic = create_backbone("vit_tiny_patch16_224", dynamic_img_size=True)
    check_input_size(dynamic, 32, "vit")
    with pytest.raises(UserError, match="multiple of 16"):
        check_input_size(dynamic, 33, "vit")
    check_input_size(create_backbone("test_resnet"), 17, "resnet")  # no patch embedding: any size


# ---------------------------------------------------------------------------------------- the readers
def test_readers_name_the_file_and_the_problem(tmp_path):
    from scan_zoo.common.readers import (
        read_json_object,
        read_safetensors,
        read_yaml_mapping,
    )

    (tmp_path / "a.yaml").write_text("just a string\n")
    with pytest.raises(UserError, match="a.yaml holds a YAML str, not a mapping"):
        read_yaml_mapping(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("a: [1\n")
    with pytest.raises(UserError, match="b.yaml is not valid YAML"):
        read_yaml_mapping(tmp_path / "b.yaml")
    (tmp_path / "c.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(UserError, match="c.json is not a JSON file: not UTF-8"):
        read_json_object(tmp_path / "c.json")
    save_file({"x": torch.ones(2)}, str(tmp_path / "ok.safetensors"))
    assert torch.equal(read_safetensors(tmp_path / "ok.safetensors")["x"], torch.ones(2))
    data = (tmp_path / "ok.safetensors").read_bytes()
    with pytest.raises(UserError, match="remote.safetensors is not a readable safetensors"):
        read_safetensors(tmp_path / "remote.safetensors", data=data[:-3])
