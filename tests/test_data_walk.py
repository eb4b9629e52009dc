"""Hostile ImageFolder trees: link loops, FIFOs, sockets, dangling links and names that are not UTF-8.

Each tree is listed safely (each real folder once, regular files only) and every name that reaches a log, list
or JSON file is written escaped, one line per file. The commands run for real, with a timeout: a hang fails.
"""

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import stat
from pathlib import Path

import pytest
from helpers import BIN, PYTHON, make_image_folder, run_cli
from torchvision import datasets

from scan_zoo.data import datasets as data_lib
from scan_zoo.data.imageio import UnreadableImage, rgb_loader

BAD = b"\xff\xfe.png"  # a name that is not UTF-8
NEWLINE = "new\nline.png"
TINY = ["--model", "test_resnet", "--image-size", "16", "--eval-resize", "16", "--num-workers", "0"]


class Hang(Exception):
    """Not an OSError (TimeoutError is one, and os.walk swallows those)."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (:class:`Hang`) instead of hanging: a FIFO read or a listing that never ends."""

    def expire(*_):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def torchvision_listing(split: Path) -> list:
    return datasets.ImageFolder(str(split), allow_empty=True).samples


def hostile(root: Path, split: str = "train") -> dict:
    """Add to ``root/split`` everything a walk must survive; returns what each kind of entry is called."""
    c0, c1 = root / split / "class_0", root / split / "class_1"
    os.symlink(".", c0 / "loop")
    os.symlink("..", c0 / "up")
    os.symlink("../class_1", c0 / "other_class")
    os.mkfifo(c0 / "x.png")
    os.symlink(root / "nowhere.png", c0 / "gone.png")
    here = os.getcwd()
    os.chdir(c1)  # a socket's path may hold at most ~108 bytes: bind it by its relative name
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind("sock.png")
    finally:
        os.chdir(here)
    good = c1 / "000.png"
    shutil.copy(good, os.fsencode(c1) + b"/" + BAD)  # decodable, under a name that is not UTF-8
    (c1 / NEWLINE).write_bytes(b"not an image")  # unreadable, under a name holding a newline
    (c1 / "broken\xe9.png").write_bytes(b"not an image either")
    open(os.fsencode(c1) + b"/broken\xfd.png", "wb").write(b"junk")  # unreadable and not UTF-8
    return {
        "left_out": {"class_0/x.png", "class_0/gone.png", "class_1/sock.png"},
        "unfollowed": {"class_0/loop", "class_0/up", "class_0/other_class"},
        "unreadable": {"class_1/new\\nline.png", "class_1/broken\xe9.png", "class_1/broken\\xfd.png"},
    }


def export_random(out: Path) -> Path:
    """A randomly initialised test_resnet exported as a model directory."""
    import torch

    from scan_zoo.models.backbones import (
        create_backbone,
        data_config_for,
        export_backbone,
    )

    torch.manual_seed(0)
    export_backbone(
        create_backbone("test_resnet"),
        out,
        data_config_for(16, 16, data_lib.IMAGENET_MEAN, data_lib.IMAGENET_STD),
        {"method": "test"},
    )
    return out


def test_display_path_escapes_whatever_a_name_holds():
    from scan_zoo.data.imageio import display_path

    assert display_path("train/class_0/001.png") == "train/class_0/001.png"  # ordinary names are unchanged
    assert display_path("é.png") == "é.png"
    assert display_path(os.fsdecode(b"a/" + BAD)) == display_path(b"a/" + BAD) == "a/\\xff\\xfe.png"
    assert display_path("a\nb\tc\rd\x7f\u2028.png") == "a\\nb\\tc\\rd\\x7f\\u2028.png"
    assert display_path("back\\slash") == "back\\\\slash"  # unambiguous: a literal backslash is doubled
    for name in (NEWLINE, os.fsdecode(BAD), "\x00\x1b[31m"):
        shown = display_path(name)
        assert shown.isprintable() and len(shown.splitlines()) == 1
        shown.encode("utf-8")  # valid UTF-8


def test_an_ordinary_tree_is_listed_exactly_as_torchvision_lists_it(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=3)
    nested = data / "train" / "class_1" / "sub" / "deeper"
    nested.mkdir(parents=True)
    shutil.copy(data / "train" / "class_1" / "000.png", nested / "a.JPG")
    shutil.copy(data / "train" / "class_1" / "000.png", data / "train" / "class_1" / "sub" / "b.png")
    (data / "train" / "class_2" / "notes.txt").write_text("not an image name: ignored")
    external = tmp_path / "external"  # a link to a folder elsewhere (a second disk) is followed, as before
    external.mkdir()
    shutil.copy(data / "train" / "class_2" / "000.png", external / "e.png")
    os.symlink(external, data / "train" / "class_2" / "more")
    (data / "train" / "empty_class").mkdir()
    ds = data_lib.image_folder(data, "train")
    assert ds.samples == torchvision_listing(data / "train")
    assert ds.skipped == [] and ds.unfollowed == []


def test_link_loops_are_followed_once_and_labels_stay_right(tmp_path, caplog):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=4)
    before = torchvision_listing(data / "train")  # 12 images
    c0 = data / "train" / "class_0"
    os.symlink(".", c0 / "loop")
    os.symlink("..", c0 / "up")
    os.symlink("../class_1", c0 / "other_class")
    os.symlink(c0, data / "train" / "class_0_again")  # a second class folder that is the first one
    external = tmp_path / "external"
    (external / "inner").mkdir(parents=True)
    shutil.copy(c0 / "000.png", external / "inner" / "e.png")
    os.symlink("..", external / "inner" / "back")  # a loop outside the split
    os.symlink(external, c0 / "ext_a")
    os.symlink(external, c0 / "ext_b")  # the same folder again: listed once
    with caplog.at_level(logging.WARNING, logger="scan_zoo"), deadline(30):
        ds = data_lib.image_folder(data, "train")
    listed = [(Path(p).relative_to(data / "train").as_posix(), ds.classes[t]) for p, t in ds.samples]
    plain = [(rel, rel.split("/")[0]) for rel in (Path(p).relative_to(data / "train").as_posix() for p, _ in before)]
    assert listed == plain[:4] + [("class_0/ext_a/inner/e.png", "class_0")] + plain[4:]
    assert all(rel.split("/")[0] == cls for rel, cls in listed)  # every image labelled by its own class folder
    assert {Path(p).name for p, _ in ds.unfollowed} == {"loop", "up", "other_class", "class_0_again", "back", "ext_b"}
    warnings = [r.getMessage() for r in caplog.records if "not listed" in r.getMessage()]
    assert len(warnings) == 1 and "6 folder(s)" in warnings[0]


def test_only_regular_files_are_opened(tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)  # opening it for reading the ordinary way blocks until a writer comes
    from scan_zoo.data.device import read_for_device

    with deadline(10):
        with pytest.raises(UnreadableImage, match="x.png: a FIFO, not a regular file"):
            rgb_loader(str(fifo))
        with pytest.raises(UnreadableImage, match="a FIFO"):
            read_for_device(str(fifo))
    with pytest.raises(UnreadableImage, match="a directory"):
        rgb_loader(str(tmp_path))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_the_listing_leaves_out_what_is_not_a_regular_file(tmp_path, caplog):
    from scan_zoo.data.folders import list_split
    from scan_zoo.data.imageio import display_path

    data = make_image_folder(tmp_path / "data", classes=2, per_class=3, val_per_class=1)
    names = hostile(data)
    with caplog.at_level(logging.WARNING, logger="scan_zoo"), deadline(30):
        ds = data_lib.image_folder(data, "train")
    rel = lambda p: display_path(os.path.relpath(p, data / "train"))  # noqa: E731
    assert {rel(p) for p, _ in ds.skipped} == names["left_out"]
    assert {rel(p) for p, _ in ds.unfollowed} == names["unfollowed"]
    assert dict((rel(p), why) for p, why in ds.skipped)["class_1/sock.png"] == "a socket, not a regular file"
    assert len(ds) == 3 + 3 + 4  # the six images, the non-UTF-8 copy and three unreadable files
    assert sum(os.fsencode(p).endswith(b"/" + BAD) for p, _ in ds.samples) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert all(len(m.splitlines()) == 1 for m in messages)
    assert sum("left out" in m for m in messages) == 1 and sum("not listed" in m for m in messages) == 1
    assert list_split(str(data / "train"), ds.class_to_idx).samples == ds.samples


def test_training_on_a_hostile_tree_neither_hangs_nor_crashes(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=3, val_per_class=1)
    names = hostile(data)
    run = tmp_path / "run"
    args = [
        PYTHON,
        "train.py",
        "--method",
        "supervised",
        "--data",
        str(data),
        "--batch-size",
        "10",
        "--epochs",
        "1",
        *TINY,
    ]
    p = run_cli([*args, "--output-dir", str(run)], timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert "3 file(s) with an image name left out" in p.stderr and "3 folder(s) not listed" in p.stderr
    raw = (run / "skipped_images.txt").read_bytes()
    lines = raw.decode("utf-8").splitlines()  # valid UTF-8, one line per file
    assert len(lines) == 3 and all(ln.startswith("step 1\t") for ln in lines)
    for name in names["unreadable"]:
        assert sum(f"train/{name}: " in ln for ln in lines) == 1, (name, lines)
    meta = json.loads((run / "config.json").read_text())["scan_zoo"]
    assert meta["num_train_images"] == 10

    from scan_zoo.common.errors import UserError
    from scan_zoo.experiments.pipeline import run_training
    from scan_zoo.train.config import build_config

    cfg = dict(
        method="supervised",
        model="test_resnet",
        data=str(data),
        output_dir=str(tmp_path / "strict"),
        epochs=1,
        batch_size=10,
        image_size=16,
        eval_resize=16,
        num_workers=0,
        strict_data=True,
    )
    with pytest.raises(UserError, match="--strict-data.*(not a regular file|dangling)"), deadline(60):
        run_training(build_config(cfg))


def test_evaluation_and_retrieval_on_a_hostile_tree(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=3, val_per_class=2)
    hostile(data, "train")
    hostile(data, "val")
    model = export_random(tmp_path / "model")
    p = run_cli(
        [
            PYTHON,
            "eval_linear.py",
            str(model),
            "--data",
            str(data),
            "--epochs",
            "1",
            "--no-progress",
            "--num-workers",
            "0",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "eval.json"),
        ],
        timeout=180,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert json.loads((tmp_path / "eval.json").read_text())

    out = tmp_path / "grid.png"
    r = run_cli(
        [
            str(BIN / "scan-zoo"),
            "retrieve",
            "--models",
            str(model),
            "--data",
            str(data),
            "--queries",
            "2",
            "--k",
            "10",
            "--out",
            str(out),
            "--num-workers",
            "0",
        ],
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.with_suffix(".json").read_bytes().decode("utf-8")
    result = json.loads(text)
    paths = [n["path"] for m in result["models"] for row in m["neighbors"] for n in row]
    assert len(paths) == 2 * 10 and len(set(paths)) == 10  # every train image, each named once per row
    assert sum(p.endswith("class_1/\\xff\\xfe.png") for p in set(paths)) == 1
    assert sum(p.endswith("class_1/new\\nline.png") for p in set(paths)) == 1
    assert "\\udc" not in text  # no lone surrogates smuggled into the JSON
