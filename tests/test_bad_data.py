"""Broken and unusual files in an ImageFolder: converted where possible, skipped and listed otherwise."""

import numpy as np
import pytest
from helpers import make_image_folder
from PIL import Image

from scan_zoo.common.errors import UserError
from scan_zoo.data.imageio import UnreadableImage, rgb_loader
from scan_zoo.experiments.pipeline import run_training
from scan_zoo.train.config import build_config


def write_modes(d):
    """One image per PIL mode real data sets contain; returns {name: expected RGB of pixel (0, 0)}."""
    d.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 200).save(d / "grey.png")
    Image.new("LA", (8, 8), (100, 255)).save(d / "grey_alpha.png")
    p = Image.new("P", (8, 8), 3)
    p.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    p.save(d / "palette.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 128)).save(d / "rgba.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(d / "sixteen_bit.png")
    return {
        "grey.png": (200, 200, 200),
        "grey_alpha.png": (100, 100, 100),
        "palette.png": (10, 20, 30),
        "rgba.png": (1, 2, 3),
        "cmyk.jpg": (255, 255, 255),
        "sixteen_bit.png": (255, 255, 255),
    }


def write_broken(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "zero_bytes.png").write_bytes(b"")
    (d / "not_an_image.jpg").write_bytes(b"hello, I am text")
    good = d / "tmp_good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    good.unlink()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    return {"zero_bytes.png", "not_an_image.jpg", "truncated.png"}


def test_every_mode_becomes_8bit_rgb(tmp_path):
    want = write_modes(tmp_path)
    for name, rgb in want.items():
        img = rgb_loader(str(tmp_path / name))
        assert img.mode == "RGB", name
        got = img.getpixel((0, 0))
        assert max(abs(a - b) for a, b in zip(got, rgb)) <= 2, (name, got, rgb)


def test_broken_files_raise_naming_the_file(tmp_path):
    for name in write_broken(tmp_path):
        with pytest.raises(UnreadableImage, match=name):
            rgb_loader(str(tmp_path / name))


def test_training_skips_counts_and_lists_unreadable_images(tmp_path):
    data = make_image_folder(tmp_path / "data")
    write_modes(data / "train" / "class_1")
    bad = write_broken(data / "train" / "class_2")
    (data / "train" / "class_9_empty").mkdir()
    (data / "val" / "class_9_empty").mkdir()
    cfg = build_config(
        dict(
            method="moco",
            model="test_resnet",
            data=str(data),
            output_dir=str(tmp_path / "run"),
            epochs=1,
            batch_size=8,
            queue_size=16,
            image_size=16,
            eval_resize=16,
            num_workers=0,
            log_every_steps=1,
        )
    )
    r = run_training(cfg)
    assert r["finished"]
    listed = (tmp_path / "run" / "skipped_images.txt").read_text()
    assert {name for name in bad if name in listed} == bad
    assert listed.count("\n") == len(bad)  # each once per epoch, nothing else
    with pytest.raises(UserError, match="--strict-data"):
        run_training(build_config({**cfg.to_dict(), "strict_data": True, "output_dir": str(tmp_path / "strict")}))


def test_a_very_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    from scan_zoo.data import imageio

    path = tmp_path / "huge.jpg"
    Image.new("RGB", (9000, 6000), (30, 60, 90)).save(path, quality=80)
    img = rgb_loader(str(path))
    assert img.mode == "RGB" and min(img.size) >= imageio.MAX_SIDE and img.size[0] < 9000
    assert abs(img.size[0] / img.size[1] - 1.5) < 0.01  # aspect ratio kept
    assert np.abs(np.asarray(img)[100, 100].astype(int) - (30, 60, 90)).max() <= 3


def test_a_decompression_bomb_is_reported_as_unreadable(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice this
    path = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(path)
    with pytest.raises(UnreadableImage, match="bomb.png.*DecompressionBomb"):
        rgb_loader(str(path))
