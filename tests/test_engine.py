"""Training runs end to end on a tiny ImageFolder: exact resume, checkpoint contents, export, no collectives."""

import json
import math

import pytest
import timm
import torch
from helpers import PYTHON, cfg_for, model_state, run_cli
from safetensors.torch import load_file

from scan_zoo.experiments.pipeline import run_training
from scan_zoo.train.checkpoints import list_checkpoints


@pytest.mark.parametrize("method", ["moco", "supervised"])
def test_stopped_after_first_epoch_and_resumed_equals_uninterrupted(tiny_data, tmp_path, method):
    full = run_training(cfg_for(tiny_data, tmp_path / "full", method=method))
    assert full["finished"]
    steps_per_epoch = 48 // 8
    part = run_training(
        cfg_for(tiny_data, tmp_path / "part", method=method, stop_after_steps=steps_per_epoch, num_workers=2)
    )  # workers must not matter: augmentation is seeded per sample
    assert not part["finished"] and part["steps"] == steps_per_epoch
    state = json.loads((list_checkpoints(tmp_path / "part")[-1] / "train_state.json").read_text())
    assert (state["epoch"], state["step"], state["step_in_epoch"]) == (1, steps_per_epoch, 0)
    resumed = run_training(cfg_for(tiny_data, tmp_path / "part", method=method, resume="latest"))
    assert resumed["finished"] and resumed["steps"] == full["steps"]
    a, b = model_state(tmp_path / "full"), model_state(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    wa = load_file(str(tmp_path / "full" / "model.safetensors"))
    wb = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_mid_epoch_is_exact_too(tiny_data, tmp_path):
    run_training(cfg_for(tiny_data, tmp_path / "full"))
    run_training(cfg_for(tiny_data, tmp_path / "part", stop_after_steps=4))  # 4 of 6 steps of epoch 0
    run_training(cfg_for(tiny_data, tmp_path / "part", resume="latest"))
    a, b = model_state(tmp_path / "full"), model_state(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_carries_queue_and_restores_it(tiny_data, tmp_path):
    from scan_zoo.train.trainer import Trainer, make_accelerator

    cfg = cfg_for(tiny_data, tmp_path / "run", stop_after_steps=3)
    run_training(cfg)
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    saved = load_file(str(ckpt / "model.safetensors"))
    assert int(saved["queue.ptr"]) == 3 * 8 % 16
    assert (saved["queue.labels"] >= 0).sum() == 16  # 24 labelled keys pushed into 16 slots
    assert {"encoder_k.backbone.conv1.0.weight", "queue.keys", "steps"} <= saved.keys()
    assert (ckpt / "config.yaml").is_file() and (ckpt / "optimizer.bin").is_file()
    assert (ckpt / "random_states_0.pkl").is_file()
    # a fresh trainer restores the queue exactly
    cfg2 = cfg_for(tiny_data, tmp_path / "run", resume="latest")
    t = Trainer(cfg2, make_accelerator(tmp_path / "run", log_with=None))
    t.load_checkpoint(ckpt)
    m = t.acc.unwrap_model(t.model)
    for name in ("keys", "labels", "ptr"):
        assert torch.equal(getattr(m.queue, name), saved[f"queue.{name}"])
    assert t.state.step == 3 and t.state.step_in_epoch == 3


def test_export_loads_strictly_into_plain_timm(tiny_data, tmp_path):
    r = run_training(cfg_for(tiny_data, tmp_path / "run", epochs=1))
    weights = load_file(r["weights"])
    model = timm.create_model("test_resnet", num_classes=0)
    model.load_state_dict(weights, strict=True)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["architecture"] == "test_resnet" and cfg["scan_zoo"]["method"] == "moco"
    assert "scan_zoo" not in cfg["pretrained_cfg"]
    # timm's own local-dir loader accepts the export
    m2 = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True)
    assert all(torch.equal(m2.state_dict()[k], weights[k]) for k in weights)
    # with a classifier, exactly the classifier is missing
    clf = timm.create_model("test_resnet", num_classes=5)
    missing, unexpected = clf.load_state_dict(weights, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def test_existing_run_is_not_overwritten_without_resume(tiny_data, tmp_path):
    from scan_zoo.common.errors import UserError

    run_training(cfg_for(tiny_data, tmp_path / "run", stop_after_steps=1))
    with pytest.raises(UserError, match="--resume latest"):
        run_training(cfg_for(tiny_data, tmp_path / "run"))


def test_single_process_calls_no_collective(tiny_data, tmp_path, monkeypatch):
    import torch.distributed as dist

    def forbidden(*a, **k):
        raise AssertionError("a single-process run called a collective")

    for name in ("all_gather", "all_reduce", "broadcast", "barrier", "all_gather_into_tensor", "reduce"):
        monkeypatch.setattr(dist, name, forbidden)
    r = run_training(cfg_for(tiny_data, tmp_path / "run", epochs=1))
    assert r["finished"]


def test_scan_run_mines_neighbours_and_starts_from_the_label_free_model(tiny_data, tmp_path):
    moco = run_training(cfg_for(tiny_data, tmp_path / "moco", epochs=1))
    cfg = cfg_for(
        tiny_data,
        tmp_path / "scan",
        method="scan",
        k=2,
        batch_size=9,
        epochs=1,
        stop_after_steps=1,
        appearance_model=moco["run_dir"],
        seed=2,
    )  # another seed than MoCo's: another random init
    r = run_training(cfg)
    assert (tmp_path / "scan" / "neighbors.safetensors").is_file()
    # one step from the MoCo weights: the key encoder is still within (1 - m) of them
    from scan_zoo.data.neighbor_table import load_neighbors

    idx, _, prov = load_neighbors(tmp_path / "scan" / "neighbors.safetensors")
    assert idx.shape == (48, 2) and prov["appearance_model"].endswith("model.safetensors")
    state = model_state(tmp_path / "scan")
    start = load_file(str(tmp_path / "moco" / "model.safetensors"))
    torch.manual_seed(2)  # the run's seed: what a random initialisation of this run would have been
    random_init = timm.create_model("test_resnet", num_classes=0).state_dict()
    for k in ("conv1.0.weight", "layer4.0.conv2.weight"):
        from_start = (state[f"encoder_q.backbone.{k}"] - start[k]).abs().max()
        key_from_start = (state[f"encoder_k.backbone.{k}"] - start[k]).abs().max()
        from_random = (random_init[k] - start[k]).abs().max()
        assert from_start < from_random / 10  # one SGD step away from MoCo's weights, not from a random init
        assert key_from_start <= from_start  # the key encoder moved only by (1 - m) of the query's step
    assert not r["finished"]


def test_bf16_mixed_precision_follows_accelerate(tiny_data, tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16` sets this variable; the loss stays float32 and finite."""
    from accelerate.state import AcceleratorState

    from scan_zoo.train.trainer import Trainer, make_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(reset_partial_state=True)  # earlier tests made a full-precision state
    try:
        cfg = cfg_for(tiny_data, tmp_path / "run", method="supcon", max_steps=2)
        t = Trainer(cfg, make_accelerator(tmp_path / "run", log_with=None))
        assert t.acc.mixed_precision == "bf16"
        r = t.fit()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert r["finished"]
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["loss"]) for row in rows)


def test_scan_resume_is_exact_and_reuses_the_neighbour_table(tiny_data, tmp_path):
    moco = run_training(cfg_for(tiny_data, tmp_path / "moco", epochs=1))
    kw = dict(method="scan", k=2, batch_size=9, epochs=2, appearance_model=moco["run_dir"])
    run_training(cfg_for(tiny_data, tmp_path / "full", **kw))
    run_training(cfg_for(tiny_data, tmp_path / "part", stop_after_steps=7, **kw))
    table = tmp_path / "part" / "neighbors.safetensors"
    mtime = table.stat().st_mtime_ns
    run_training(cfg_for(tiny_data, tmp_path / "part", resume="latest", **kw))
    assert table.stat().st_mtime_ns == mtime  # same appearance model: not mined again
    a, b = model_state(tmp_path / "full"), model_state(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_training_checkpoint_is_a_model_reference(tiny_data, tmp_path):
    from scan_zoo.models.loading import load_backbone

    run_training(cfg_for(tiny_data, tmp_path / "run", epochs=1))
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    model, desc = load_backbone(str(ckpt))
    export = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], export[k]) for k in export)
    from scan_zoo.models.convert import read_checkpoint, to_timm

    converted = to_timm(read_checkpoint(ckpt / "model.safetensors"), "test_resnet")
    assert converted.keys() == export.keys() and all(torch.equal(converted[k], export[k]) for k in export)


PERSISTENT_WORKERS_SCRIPT = """
import gc, sys
import torch
from scan_zoo.train.config import build_config
from scan_zoo.experiments.pipeline import run_training
data, out = sys.argv[1:]
for i in range(2):
    run_training(build_config({"method": "moco", "data": data, "output_dir": f"{out}/r{i}", "max_steps": 2,
                               "batch_size": 16, "queue_size": 32, "num_workers": 2, "image_size": 16}))
    # the workers of a later loader collect garbage: an old persistent loader iterator must not be there
    ds = torch.utils.data.TensorDataset(torch.zeros(64, 1))
    for _ in torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, worker_init_fn=lambda _: gc.collect()):
        pass
"""


def test_persistent_loader_workers_end_with_the_run(tiny_data, tmp_path):
    """Two runs in one process (as the bench does), then a loader: no 'can only test a child process' errors
    from a finished run's persistent workers being collected inside a forked worker."""
    script = tmp_path / "runs.py"
    script.write_text(PERSISTENT_WORKERS_SCRIPT)
    p = run_cli([PYTHON, str(script), str(tiny_data), str(tmp_path / "out")])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "can only test a child process" not in p.stderr
