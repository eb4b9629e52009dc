"""Two CPU processes (gloo): the collectives, and real 2-process training runs through the launchers."""

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import BIN, COMMON, free_port, launch, run_cli
from safetensors.torch import load_file


def _worker(rank, world, port, out):
    from scan_zoo.common import distributed as D

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    n = 3 + rank  # unequal sizes: 3 and 4
    x = torch.arange(n, dtype=torch.float32)[:, None] + 100 * rank  # [n, 1]
    sizes = D.gather_sizes(n, x.device)
    gathered = D.gather_cat(x, sizes)
    g = torch.Generator().manual_seed(7)
    shuffled, idx_un, sizes2 = D.shuffle_across(x, g)
    back = D.unshuffle_across(shuffled * 2, idx_un, sizes2)  # an elementwise "model"
    torch.save(
        {"sizes": sizes, "gathered": gathered, "shuffled": shuffled, "back": back, "x": x},
        os.path.join(out, f"r{rank}.pt"),
    )
    dist.destroy_process_group()


def test_gather_and_shuffle_bn_round_trip(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"r{i}.pt", weights_only=True) for i in range(2)]
    want = torch.cat([r[0]["x"], r[1]["x"]])
    for i in range(2):
        assert r[i]["sizes"] == [3, 4]
        assert torch.equal(r[i]["gathered"], want)
        assert torch.equal(r[i]["back"], r[i]["x"] * 2)  # each process gets its own rows back, in order
        assert len(r[i]["shuffled"]) == len(r[i]["x"])
    # the shuffle really mixes the processes' samples (fixed seed: deterministic)
    all_shuffled = torch.cat([r[0]["shuffled"], r[1]["shuffled"]])
    assert sorted(all_shuffled.flatten().tolist()) == sorted(want.flatten().tolist())
    assert not torch.equal(all_shuffled, want)


def test_two_process_moco_then_scan(tiny_data, tmp_path):
    p = launch(
        [
            "--method",
            "moco",
            "--data",
            str(tiny_data),
            "--batch-size",
            "8",
            "--queue-size",
            "40",
            "--max-steps",
            "3",
            "--output-dir",
            str(tmp_path / "moco"),
            *COMMON,
        ]
    )
    assert p.returncode == 0, p.stderr[-3000:]
    state = load_file(str(tmp_path / "moco" / "model.safetensors"))
    assert state  # exported backbone
    ckpts = sorted((tmp_path / "moco" / "checkpoints").glob("step_*"))
    ck = load_file(str(ckpts[-1] / "model.safetensors"))
    assert int(ck["queue.ptr"]) == (3 * 16) % 40  # both processes' keys enqueued each step
    assert (ck["queue.labels"] >= 0).sum() == 40
    assert (ckpts[-1] / "random_states_1.pkl").is_file()  # every process's RNG saved

    p = launch(
        [
            "--method",
            "scan",
            "--data",
            str(tiny_data),
            "--batch-size",
            "9",
            "--k",
            "2",
            "--queue-size",
            "40",
            "--max-steps",
            "3",
            "--appearance-model",
            str(tmp_path / "moco"),
            "--output-dir",
            str(tmp_path / "scan"),
            *COMMON,
        ]
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "scan" / "neighbors.safetensors").is_file()
    assert (tmp_path / "scan" / "model.safetensors").is_file()


def test_torchrun_works_too(tiny_data, tmp_path):
    p = run_cli(
        [
            str(BIN / "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "train.py",
            "--method",
            "supcon",
            "--data",
            str(tiny_data),
            "--batch-size",
            "8",
            "--queue-size",
            "40",
            "--max-steps",
            "2",
            "--output-dir",
            str(tmp_path / "run"),
            *COMMON,
        ]
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_default_pipeline_on_two_processes(digits_root, tmp_path):
    """The acceptance command: the default pipeline, every stage capped at 5 steps, on 2 processes."""
    env = {"SCAN_ZOO_CACHE": str(Path(digits_root).parent)}
    p = launch(["--max-steps", "5", "--output-dir", str(tmp_path / "D")], env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    for stage in ("moco", "scan"):
        ckpts = list((tmp_path / "D" / stage / "checkpoints").glob("step_*"))
        assert [c.name for c in ckpts] == ["step_00000005"]
        assert (tmp_path / "D" / stage / "model.safetensors").is_file()
    assert "kNN top-1" in p.stdout and "scan" in p.stdout
