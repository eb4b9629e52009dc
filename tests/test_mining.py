"""Stage 1 end to end: the feature-file path for big data sets gives the in-memory path's table, bit for bit."""

import timm
import torch

from scan_zoo.data.neighbor_table import load_neighbors
from scan_zoo.models.backbones import data_config_for, export_backbone
from scan_zoo.train.mining import mine_dataset


def test_features_mined_from_a_file_give_the_in_memory_table(tmp_path, tiny_data, monkeypatch):
    import scan_zoo.train.mining as mining

    calls = []
    extract_to_file = mining.extract_to_file
    monkeypatch.setattr(mining, "extract_to_file", lambda *a, **kw: calls.append(1) or extract_to_file(*a, **kw))
    torch.manual_seed(0)
    export_backbone(
        timm.create_model("test_resnet", num_classes=0),
        tmp_path / "m",
        data_config_for(16, 16, (0.5,) * 3, (0.5,) * 3),
        {"method": "none"},
    )
    common = dict(
        appearance_model=str(tmp_path / "m"), data_root=tiny_data, k=3, image_size=16, num_workers=0, batch_size=5
    )  # batches that do not divide the 48 images
    in_memory = mine_dataset(out=tmp_path / "a" / "nb.safetensors", **common)
    assert not calls
    from_file = mine_dataset(out=tmp_path / "b" / "nb.safetensors", in_memory_max_bytes=0, **common)
    assert calls == [1] and torch.equal(in_memory, from_file)
    a = load_neighbors(tmp_path / "a" / "nb.safetensors")
    b = load_neighbors(tmp_path / "b" / "nb.safetensors")
    assert torch.equal(a[1], b[1]) and a[2] == b[2]  # similarities and provenance too
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["nb.safetensors"]  # the feature file is gone


SCRIPT = """
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

import scan_zoo.train.mining as mining

calls = []
extract_to_file = mining.extract_to_file
mining.extract_to_file = lambda *args, **kwargs: calls.append(1) or extract_to_file(*args, **kwargs)
acc = Accelerator(cpu=True)
model, data, out, limit = sys.argv[1:]
table = mining.mine_dataset(model, Path(data), Path(out), 3, 16, num_workers=0, batch_size=5, accelerator=acc,
                            in_memory_max_bytes=int(limit))
torch.save({"table": table, "file": bool(calls)}, f"{out}.rank{acc.process_index}.pt")
acc.wait_for_everyone()
torch.distributed.destroy_process_group()  # exiting with a live gloo group can abort ("terminate called ...")
"""


def test_two_processes_write_one_feature_file_and_agree(tmp_path, tiny_data):
    """Each process writes its shard of the file, the main process mines it, every process gets the table,
    and it is the table the all-gather path gives."""
    import socket

    from helpers import BIN, run_cli

    export_backbone(
        timm.create_model("test_resnet", num_classes=0),
        tmp_path / "m",
        data_config_for(16, 16, (0.5,) * 3, (0.5,) * 3),
        {"method": "none"},
    )
    (tmp_path / "mine2.py").write_text(SCRIPT)
    tables = {}
    for name, limit in (("memory", 1 << 40), ("file", 0)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = tmp_path / name / "nb.safetensors"
        p = run_cli(
            [
                str(BIN / "torchrun"),
                "--nproc_per_node",
                "2",
                "--master_port",
                str(port),
                str(tmp_path / "mine2.py"),
                str(tmp_path / "m"),
                str(tiny_data),
                str(out),
                str(limit),
            ]
        )
        assert p.returncode == 0, p.stderr[-3000:]
        got = [torch.load(f"{out}.rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert [g["file"] for g in got] == [name == "file"] * 2  # the path under test was taken, by both
        tables[name] = [g["table"] for g in got]
        assert not (tmp_path / name / "nb.features.npy").exists()
    assert all(torch.equal(t, tables["memory"][0]) for t in tables["memory"] + tables["file"])
