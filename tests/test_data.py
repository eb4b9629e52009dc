"""Digit scenes, seeded augmentation and the neighbour batch sampler."""

import numpy as np
import pytest
import torch
from PIL import Image

from scan_zoo.data import datasets as D
from scan_zoo.data.digits import load_metadata, render_scene


# ------------------------------------------------------------------------------------------ sampler
def table(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, n, (n, k), generator=g)
    t[::7] = -1  # some images from tiny classes
    return t


@pytest.mark.parametrize("n,anchors,world,k", [(50, 4, 2, 2), (47, 5, 2, 0), (23, 3, 3, 1), (10, 16, 2, 2)])
def test_every_anchor_exactly_once_per_epoch_across_processes(n, anchors, world, k):
    nb = table(n, k) if k else None
    samplers = [D.NeighborBatchSampler(n, anchors, nb, rank=r, world_size=world, seed=3) for r in range(world)]
    lengths = {len(s) for s in samplers}
    assert len(lengths) == 1  # every process takes the same number of steps
    seen = []
    for s in samplers:
        s.set_epoch(1)
        for b in s:
            assert len(b) % (k + 1) == 0
            assert 1 <= len(b) // (k + 1) <= anchors
            seen += [b[i][0] for i in range(0, len(b), k + 1)]  # the anchors
    assert sorted(seen) == list(range(n))  # no anchor lost or repeated, no overlap between processes


def test_each_anchor_is_followed_by_its_neighbours_and_shares_their_group():
    n, k = 40, 3
    nb = table(n, k)
    s = D.NeighborBatchSampler(n, 4, nb, rank=1, world_size=2, seed=0)
    groups_seen = set()
    for b in s:
        for a in range(0, len(b), k + 1):
            anchor, _, group = b[a]
            want = [anchor if j < 0 else j for j in nb[anchor].tolist()]
            assert [e[0] for e in b[a + 1 : a + k + 1]] == want
            assert {e[2] for e in b[a : a + k + 1]} == {group}
            assert group not in groups_seen
            groups_seen.add(group)


def test_a_process_never_gets_an_empty_batch():
    from scan_zoo.common.errors import UserError

    with pytest.raises(UserError, match="empty batch"):
        D.NeighborBatchSampler(7, 1, rank=0, world_size=2)
    D.NeighborBatchSampler(8, 1, rank=0, world_size=2)  # divisible: every step has one anchor per process


def test_groups_are_unique_across_processes_and_seeds_differ_per_slot():
    s0 = D.NeighborBatchSampler(30, 3, table(30, 2), rank=0, world_size=2)
    s1 = D.NeighborBatchSampler(30, 3, table(30, 2), rank=1, world_size=2)
    b0, b1 = s0.batch(0), s1.batch(0)
    assert not {e[2] for e in b0} & {e[2] for e in b1}
    seeds = [e[1] for e in b0 + b1]
    assert len(set(seeds)) == len(seeds)


def test_resuming_mid_epoch_yields_the_remaining_batches():
    s = D.NeighborBatchSampler(60, 4, table(60, 2), seed=5)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_step=3)
    assert list(s) == full[3:]
    s.set_epoch(3)
    assert list(s) != full  # a new permutation each epoch


def test_augmentation_is_a_function_of_the_seed_only(tiny_data):
    base = D.image_folder(tiny_data, "train")
    ds = D.SeededViews(base, D.MultiView(D.moco_v2_transform(16), 2))
    torch.manual_seed(0)
    a = ds[(3, 1234, 0)]
    torch.manual_seed(99)
    state = torch.random.get_rng_state()
    b = ds[(3, 1234, 0)]
    assert torch.equal(torch.random.get_rng_state(), state)  # caller's RNG untouched
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    c = ds[(3, 1235, 0)]
    assert not torch.equal(a[0][0], c[0][0])
    assert not torch.equal(a[0][0], a[0][1])  # the two views differ


def test_missing_data_directory_is_a_user_error(tmp_path):
    from scan_zoo.common.errors import UserError

    with pytest.raises(UserError, match="not found"):
        D.image_folder(tmp_path / "nope", "train")
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="no 'train' folder"):
        D.image_folder(tmp_path / "d", "train")


# ------------------------------------------------------------------------------------ digit scenes
def test_render_scene_is_deterministic_and_consistent():
    glyph = np.zeros((8, 8))
    glyph[1:7, 3:5] = 16  # a "1"
    a = render_scene(glyph, np.random.default_rng(7))
    b = render_scene(glyph, np.random.default_rng(7))
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    x0, y0, x1, y1 = a["bbox"]
    ys, xs = np.nonzero(a["mask"])
    assert xs.min() == x0 and xs.max() + 1 == x1 and ys.min() == y0 and ys.max() + 1 == y1
    # fully covered pixels have the foreground colour, uncovered ones the background colour
    img = a["image"].astype(int)
    corner = img[0, 0] if not a["mask"][0, 0] else img[-1, -1]
    assert np.abs(corner - a["bg"]).max() <= 1


def test_digit_scenes_tree_and_metadata(digits_root):
    meta = load_metadata(digits_root)
    n = len(meta["path"])
    assert n == 1797 * 4
    train_glyphs = set(meta["glyph"][meta["split"] == "train"].tolist())
    val_glyphs = set(meta["glyph"][meta["split"] == "val"].tolist())
    assert not train_glyphs & val_glyphs  # split by glyph
    assert len(val_glyphs) == pytest.approx(0.2 * 1797, abs=10)
    ds = D.image_folder(digits_root, "train")
    assert ds.classes == [str(c) for c in range(10)] and len(ds) == (meta["split"] == "train").sum()
    for i in [0, 1234, n - 1]:  # files on disk match their metadata
        path = digits_root / meta["path"][i]
        assert path.parent.name == str(meta["label"][i])
        img = np.asarray(Image.open(path)).astype(float)
        m = meta["mask"][i]
        fg, bg = meta["fg"][i].astype(float), meta["bg"][i].astype(float)
        # glyph pixels (coverage >= 0.5) lie nearer the foreground colour, the others nearer the background
        d_fg, d_bg = np.linalg.norm(img - fg, axis=-1), np.linalg.norm(img - bg, axis=-1)
        assert (d_fg[m] <= d_bg[m] + 2).all() and (d_bg[~m] <= d_fg[~m] + 2).all()


def test_digit_scenes_are_reproducible(tmp_path, digits_root):
    from scan_zoo.data.digits import render_digits

    again = render_digits(tmp_path / "again", progress=False)
    for rel in ["train/3/" + sorted(p.name for p in (digits_root / "train/3").iterdir())[0], "digits.json"]:
        assert (again / rel).read_bytes() == (digits_root / rel).read_bytes()
    a, b = load_metadata(again), load_metadata(digits_root)
    assert all(np.array_equal(a[k], b[k]) for k in a)
