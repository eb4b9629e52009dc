"""The input pipeline's fast paths against their slow references (all on the CPU).

--decode device: every batched operation against a per-image torchvision reference, the plan against what the PIL
pipeline draws, decoding against PIL, a training run that resumes exactly. --decode cpu (benchmarks/data.py): the
separable blur, the fused ToTensor + Normalize, seeding the CPU generator alone, the decoded-image cache."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F1
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision import transforms as T

from scan_zoo.data import datasets as D
from scan_zoo.data import device as DD
from scan_zoo.data import transforms as transforms_lib


def scene(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth photo-like uint8 [h, w, 3] image: gradients, a disc, mild noise (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b, c = rng.uniform(0.2, 1.5, 3)
    img = np.stack(
        [
            128 + 100 * np.sin(a * xx / 17 + seed),
            128 + 100 * np.cos(b * yy / 23),
            128 + 90 * np.sin(c * (xx + yy) / 31),
        ],
        -1,
    )
    cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, min(h, w) / 5
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def jpeg_folder(root: Path, classes: int = 2, per_class: int = 6, size=(90, 120)) -> Path:
    for c in range(classes):
        d = root / "train" / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(scene(*size, seed=10 * c + i)).save(d / f"{i:02d}.jpg", quality=92)
    return root


@pytest.fixture
def jpegs(tmp_path) -> Path:
    return jpeg_folder(tmp_path / "jpegs")


def random_images(n=6, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


# ------------------------------------------------------------------------- batched ops vs per-image torchvision
@pytest.mark.parametrize(
    "op,ref,lo,hi",
    [
        (DD.adjust_brightness, F.adjust_brightness, 0.6, 1.4),
        (DD.adjust_contrast, F.adjust_contrast, 0.6, 1.4),
        (DD.adjust_saturation, F.adjust_saturation, 0.0, 1.6),
        (DD.adjust_hue, F.adjust_hue, -0.5, 0.5),
    ],
)
def test_batched_colour_ops_match_torchvision_per_image(op, ref, lo, hi):
    x = random_images()
    x[0] = x[0, :1]  # a grey image: hue undefined, saturation 0
    x[1, :, :4] = 0.0  # black rows: value 0
    f = torch.linspace(lo, hi, len(x))
    got = op(x.clone(), f)
    want = torch.stack([ref(img, float(fi)) for img, fi in zip(x, f)])
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_batched_gray_and_blur_match_torchvision_per_image():
    x = random_images(n=5, size=20)
    torch.testing.assert_close(
        DD.rgb_to_gray(x).expand(-1, 3, -1, -1),
        torch.stack([F.rgb_to_grayscale(img, num_output_channels=3) for img in x]),
        atol=1e-6,
        rtol=0,
    )
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    got = D.gaussian_blur(x, 7, sigma)
    want = torch.stack([F.gaussian_blur(img, [7, 7], [float(s), float(s)]) for img, s in zip(x, sigma)])
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    want_v1 = torch.stack([F1.gaussian_blur(img, [7, 7], [float(s), float(s)]) for img, s in zip(x, sigma)])
    torch.testing.assert_close(got, want_v1, atol=2e-6, rtol=0)  # what T.GaussianBlur does on the CPU path


def test_separable_blur_transform_equals_torchvision_on_pil_images():
    """data.GaussianBlur (two 1-D passes) against torchvision's T.GaussianBlur (k x k kernel): same draw, same image
    up to the rounding to 8 bits."""
    img = Image.fromarray(scene(60, 80, seed=4))
    for size, seed in ((23, 0), (23, 1), (3, 2), (9, 3)):
        ours, ref = D.GaussianBlur(size, sigma=(0.1, 2.0)), T.GaussianBlur(size, sigma=(0.1, 2.0))
        torch.manual_seed(seed)
        a = np.asarray(ours(img), dtype=int)
        torch.manual_seed(seed)
        b = np.asarray(ref(img), dtype=int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
    x = torch.rand(3, 20, 30)
    torch.testing.assert_close(
        D.gaussian_blur_image(x, 5, 1.3), F1.gaussian_blur(x, [5, 5], [1.3, 1.3]), atol=2e-6, rtol=0
    )


def reference_augment(x: torch.Tensor, plan: dict, kernel: int, mean, std) -> torch.Tensor:
    """The slow reference: one image at a time, torchvision v2 functional, in ColorJitter's per-image order."""
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    out = []
    for i, img in enumerate(x):
        for op in plan["order"][i].tolist():
            f = float(plan["factors"][i, op])
            if f != DD.IDENTITY[op]:
                img = ops[op](img, f)
        if plan["gray"][i]:
            img = F.rgb_to_grayscale(img, num_output_channels=3)
        if plan["sigma"][i] > 0:
            s = float(plan["sigma"][i])
            img = F.gaussian_blur(img, [kernel, kernel], [s, s])
        if plan["flip"][i]:
            img = F.horizontal_flip(img)
        out.append(F.normalize(img, list(mean), list(std)))
    return torch.stack(out)


def test_augment_equals_the_per_image_reference_for_drawn_plans():
    tf = D.MultiView(D.moco_v2_transform(24, blur_prob=0.7), 2)
    views = DD.DeviceViews(tf)
    x = random_images(n=16)
    plans = []
    for seed in range(8):
        torch.manual_seed(seed)
        plans.append(DD.draw_plan(tf, 24, 24))  # [V, ...] each: 8 images x 2 views
    flat = {k: torch.cat([p[k] for p in plans]) for k in DD.PLAN_KEYS}
    assert flat["gray"].any() and (flat["sigma"] > 0).any() and flat["flip"].any() and not flat["flip"].all()
    assert len({tuple(o) for o in flat["order"].tolist()}) > 3  # several jitter orders
    got = views.augment(x.clone(), flat)
    want = reference_augment(x, flat, views.kernel_size, views.mean, views.std)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- the plan and the crop geometry
class Recorder:
    """Records what the CPU pipeline's transforms apply (torchvision.transforms.functional, patched)."""

    def __init__(self, monkeypatch):
        self.events = []
        mod = T.transforms.F  # the functional module the v1 transforms call
        for name in (
            "resized_crop",
            "adjust_brightness",
            "adjust_contrast",
            "adjust_saturation",
            "adjust_hue",
            "rgb_to_grayscale",
            "gaussian_blur",
            "hflip",
        ):
            monkeypatch.setattr(mod, name, self._wrap(name, getattr(mod, name)))
        monkeypatch.setattr(
            transforms_lib, "gaussian_blur_image", self._wrap("gaussian_blur_image", D.gaussian_blur_image)
        )

    def _wrap(self, name, fn):
        def wrapped(img, *args, **kwargs):
            if name == "resized_crop":
                self.events.append(("crop", tuple(args[:4])))
            elif name == "gaussian_blur":  # torchvision's T.GaussianBlur
                self.events.append(("blur", round(float(args[1][0]), 6)))
            elif name == "gaussian_blur_image":  # scan_zoo.data.datasets.GaussianBlur
                self.events.append(("blur", round(float(args[1]), 6)))
            elif name.startswith("adjust_"):
                self.events.append((name[7:], round(float(args[0]), 6)))
            else:
                self.events.append((name,))
            return fn(img, *args, **kwargs)

        return wrapped


def plan_events(plan: dict, v: int) -> list:
    names = ("brightness", "contrast", "saturation", "hue")
    ev = [("crop", tuple(plan["crop"][v].tolist()))]
    for op in plan["order"][v].tolist():
        f = float(plan["factors"][v, op])
        if f != DD.IDENTITY[op]:
            ev.append((names[op], round(f, 6)))
    if plan["gray"][v]:
        ev.append(("rgb_to_grayscale",))
    if plan["sigma"][v] > 0:
        ev.append(("blur", round(float(plan["sigma"][v]), 6)))
    if plan["flip"][v]:
        ev.append(("hflip",))
    return ev


@pytest.mark.parametrize(
    "make",
    [
        lambda: D.moco_v2_transform(32, blur_prob=0.5),
        lambda: D.moco_v2_transform(32, 0.5, 0.0, False, 0.5, 0.5),  # digits recipe
        lambda: D.supervised_transform(32),
        lambda: T.Compose(
            [T.RandomResizedCrop(32), T.RandomApply([T.GaussianBlur(5)], p=0.7), T.RandomHorizontalFlip(), T.ToTensor()]
        ),
    ],
)
def test_plan_is_exactly_what_the_pil_pipeline_applies_under_the_same_seed(monkeypatch, make):
    tf = D.MultiView(make(), 2)
    img = Image.fromarray(scene(45, 70, seed=3))
    rec = Recorder(monkeypatch)
    for seed in range(40):
        rec.events.clear()
        torch.manual_seed(seed)
        tf(img)
        torch.manual_seed(seed)
        plan = DD.draw_plan(tf, 45, 70)
        assert rec.events == plan_events(plan, 0) + plan_events(plan, 1), seed


def test_crop_geometry_is_exact():
    """Crops whose box is the output size (no resampling) are exactly the box; a resampled one matches the
    per-image torchvision reference bit for bit and PIL's crop + bilinear resize within rounding."""
    h, w = 40, 50
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = torch.stack([xx * 5, yy * 6, (xx + yy) * 2]).to(torch.uint8)  # [3, H, W] pixel = its coordinates
    views = DD.DeviceViews(D.MultiView(D.moco_v2_transform(16), 2))
    boxes = torch.tensor([[[0, 0, 16, 16], [24, 34, 16, 16]], [[3, 7, 16, 16], [11, 2, 16, 16]]])  # [B, V, 4]
    out = views.crops([img, img], boxes)  # [V B, 3, 16, 16] view-major
    for v in range(2):
        for b in range(2):
            i, j, bh, bw = boxes[b, v].tolist()
            assert torch.equal(out[v * 2 + b], img[:, i : i + bh, j : j + bw])
    box = [5, 8, 30, 33]
    got = views.crops([img], torch.tensor([[box]]))[0]
    assert torch.equal(got, F.resized_crop(img, *box, [16, 16], antialias=True))
    pil = Image.fromarray(img.permute(1, 2, 0).numpy()).crop((8, 5, 8 + 33, 5 + 30)).resize((16, 16), Image.BILINEAR)
    diff = (got.int() - torch.from_numpy(np.asarray(pil)).permute(2, 0, 1).int()).abs()
    assert diff.max() <= 2, diff.max()


def test_seeding_only_the_cpu_generator_gives_the_crops_torch_manual_seed_gave(tiny_data):
    """SeededViews seeds torch.default_generator alone (fast); the reference is torch.manual_seed (every device)."""
    base = D.image_folder(tiny_data, "train")
    tf = D.MultiView(D.moco_v2_transform(16), 2)
    ds = D.SeededViews(base, tf)
    for index, seed in ((0, 5), (7, 2**62 + 3), (30, 123456789)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            want = tf(base[index][0])
        got = ds[(index, seed, 0)][0]
        assert all(torch.equal(a, b) for a, b in zip(got, want))


# ------------------------------------------------------------------------------------------------- decoding
def test_decoded_jpeg_matches_pil(tmp_path):
    from torchvision.io import ImageReadMode, decode_jpeg

    path = tmp_path / "a.jpg"
    Image.fromarray(scene(75, 100, seed=1)).save(path, quality=90)
    data, (h, w) = DD.read_for_device(str(path))
    assert data.ndim == 1 and data.dtype == torch.uint8 and (h, w) == (75, 100)
    got = decode_jpeg(data, mode=ImageReadMode.RGB, device="cpu")
    want = DD.pil_to_tensor(Image.open(path).convert("RGB"))
    diff = (got.int() - want.int()).abs()
    assert got.shape == want.shape and diff.float().mean() < 1.0 and diff.max() <= 8


def test_non_jpeg_is_decoded_by_the_worker_and_said_so(tiny_data, tmp_path, caplog):
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(scene(20, 30, 2)).convert("CMYK").save(cmyk)
    data, size = DD.read_for_device(str(cmyk))
    assert data.shape == (3, 20, 30) and size == (20, 30)  # CMYK JPEG: PIL, as with --decode cpu
    png, size = DD.read_for_device(str(next((tiny_data / "train").rglob("*.png"))))
    assert png.shape == (3, 16, 16) and size == (16, 16)
    with caplog.at_level(logging.INFO, logger="scan_zoo.data.device"):
        DD.EncodedViews(D.image_folder(tiny_data, "train"), D.MultiView(D.moco_v2_transform(16), 2))
    assert "48 of 48 training images are not JPEG (48 .png)" in caplog.text
    assert "decode them on the CPU" in caplog.text


def test_unreadable_files_are_skipped_as_with_decode_cpu(jpegs, caplog):
    files = sorted((jpegs / "train").rglob("*.jpg"))
    files[1].write_bytes(b"")  # PIL cannot open it: skipped by the worker
    raw = files[2].read_bytes()
    files[2].write_bytes(raw[: len(raw) // 3])  # header fine, data truncated: refused by the decoder and by PIL
    base = D.image_folder(jpegs, "train")
    tf = D.MultiView(D.moco_v2_transform(32), 2)
    ds = DD.EncodedViews(base, tf)
    batch = DD.collate_encoded([ds[(i, 100 + i, i)] for i in range(4)])
    assert len(batch["skipped"]) == 1 and str(files[1]) in batch["skipped"][0]
    out = DD.DeviceViews(tf)(batch, "cpu")
    assert len(out["skipped"]) == 2 and str(files[2]) in out["skipped"][1]
    assert out["index"].tolist() == [0, 3] and [v.shape for v in out["views"]] == [(2, 3, 32, 32)] * 2


def test_unsupported_transform_is_refused():
    from scan_zoo.common.errors import UserError

    with pytest.raises(UserError, match="RandomRotation"):
        DD.DeviceViews(D.MultiView(T.Compose([T.RandomResizedCrop(8), T.RandomRotation(10)]), 2))


# ------------------------------------------------------------------------------ the whole path vs the PIL one
def test_device_views_match_the_pil_pipeline_for_the_same_seeds(jpegs):
    """Same seeds, same decisions: per pixel the two pipelines differ only by rounding, and their statistics agree."""
    base = D.image_folder(jpegs, "train")
    tf = D.MultiView(D.moco_v2_transform(48), 2)
    cpu, dev = D.SeededViews(base, tf), DD.EncodedViews(base, tf)
    items = [(i % len(base), 7 + i, i) for i in range(24)]
    want = D.collate_views([cpu[it] for it in items])["views"]
    state = torch.random.get_rng_state()
    batch = DD.collate_encoded([dev[it] for it in items])
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG untouched
    got = DD.DeviceViews(tf)(batch, "cpu")
    assert sorted(got) == ["group", "index", "label", "skipped", "views"]
    for g, w in zip(got["views"], want):
        assert g.shape == w.shape == (24, 3, 48, 48) and g.dtype == torch.float32 and g.device.type == "cpu"
        assert torch.isfinite(g).all()
        lo = (0 - torch.tensor(D.IMAGENET_MEAN)) / torch.tensor(D.IMAGENET_STD)
        hi = (1 - torch.tensor(D.IMAGENET_MEAN)) / torch.tensor(D.IMAGENET_STD)
        assert (g >= lo.view(1, 3, 1, 1) - 1e-5).all() and (g <= hi.view(1, 3, 1, 1) + 1e-5).all()
        diff = (g - w).abs()  # normalised units: 0.0175 is one 8-bit level of the green channel
        assert diff.mean() < 0.05, diff.mean()
        assert (diff.mean(dim=(1, 2, 3)) < 0.15).all()
        torch.testing.assert_close(g.mean(dim=(0, 2, 3)), w.mean(dim=(0, 2, 3)), atol=0.02, rtol=0)
        torch.testing.assert_close(g.std(dim=(0, 2, 3)), w.std(dim=(0, 2, 3)), atol=0.02, rtol=0)
    assert not torch.equal(got["views"][0], got["views"][1])
    again = DD.DeviceViews(tf)(DD.collate_encoded([dev[it] for it in items]), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(again["views"], got["views"]))  # a function of the seeds only


def test_digits_png_path_matches_the_pil_pipeline(tiny_data):
    """Non-JPEG (decoded by the workers): the same crops and decisions, augmentation on the device."""
    base = D.image_folder(tiny_data, "train")
    tf = D.MultiView(D.moco_v2_transform(16, 0.5, 0.0, False, 0.5, 0.5), 2)
    items = [(i, 50 + i, i) for i in range(16)]
    want = D.collate_views([D.SeededViews(base, tf)[it] for it in items])["views"]
    got = DD.DeviceViews(tf)(DD.collate_encoded([DD.EncodedViews(base, tf)[it] for it in items]), "cpu")["views"]
    for g, w in zip(got, want):
        assert (g - w).abs().mean() < 0.05


# --------------------------------------------------------------------------------------------------- training
def test_training_with_decode_device_resumes_exactly(jpegs, tmp_path):
    from safetensors.torch import load_file

    from scan_zoo.experiments.pipeline import run_training
    from scan_zoo.train.checkpoints import list_checkpoints
    from scan_zoo.train.config import build_config

    def cfg(out, **kw):
        base = dict(
            method="moco",
            model="test_resnet",
            data=str(jpegs),
            output_dir=str(out),
            epochs=2,
            batch_size=4,
            queue_size=8,
            image_size=32,
            num_workers=0,
            log_every_steps=1,
            lr=0.05,
            seed=1,
            decode="device",
        )
        return build_config({**base, **kw})

    full = run_training(cfg(tmp_path / "full"))
    assert full["finished"] and full["steps"] == 6
    run_training(cfg(tmp_path / "part", stop_after_steps=2, num_workers=2))  # workers must not matter
    run_training(cfg(tmp_path / "part", resume="latest"))
    a = load_file(str(list_checkpoints(tmp_path / "full")[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(tmp_path / "part")[-1] / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = (tmp_path / "full" / "config.yaml").read_text()
    assert "decode: device" in saved
    rows = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_decode_option_is_validated():
    from scan_zoo.common.errors import UserError
    from scan_zoo.train.config import build_config

    assert build_config({}).decode == "cpu"
    with pytest.raises(UserError, match="decode must be 'cpu' or 'device'"):
        build_config({"decode": "gpu"})


# ------------------------------------------------------------------------- the CPU pipeline's fast paths
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_to_normalized_tensor_is_bit_identical_to_totensor_then_normalize(mode):
    img = Image.fromarray(scene(13, 17, seed=5)).convert(mode)
    c = len(img.getbands())
    mean, std = (0.485, 0.456, 0.406, 0.5)[:c], (0.229, 0.224, 0.225, 0.25)[:c]
    got = D.ToNormalizedTensor(mean, std)(img)
    want = T.Normalize(mean, std)(T.ToTensor()(img))
    assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_moco_v2_views_unchanged_by_the_fast_paths(tiny_data):
    """The whole two-crop transform (blur on) against the same transform built from torchvision's own
    ToTensor + Normalize and GaussianBlur: identical but for the blur's 8-bit rounding."""
    img = D.image_folder(tiny_data, "train")[0][0].resize((40, 40))
    ours = D.moco_v2_transform(24, blur_prob=1.0)
    ref = T.Compose(
        [
            T.GaussianBlur(t.transforms[0].kernel_size, t.transforms[0].sigma)
            if isinstance(t, T.RandomApply) and isinstance(t.transforms[0], D.GaussianBlur)
            else t
            for t in ours.transforms[:-1]
        ]
    )
    ref = T.Compose(
        [T.RandomApply([r], p=1.0) if isinstance(r, T.GaussianBlur) else r for r in ref.transforms]
        + [T.ToTensor(), T.Normalize(D.IMAGENET_MEAN, D.IMAGENET_STD)]
    )
    for seed in range(10):
        torch.manual_seed(seed)
        a = ours(img)
        torch.manual_seed(seed)
        b = ref(img)
        assert (a - b).abs().max() <= 1.01 / 255 / 0.224  # at most one 8-bit level


def test_decoded_cache_returns_what_rgb_loader_returns_and_rereads_changed_files(tiny_data):
    import os

    from scan_zoo.data.imageio import UnreadableImage, rgb_loader

    base = D.cache_small_dataset(D.image_folder(tiny_data, "train"))
    cache = base.loader
    assert isinstance(cache, D.DecodedCache)
    path = base.samples[5][0]
    first, again = cache(path), cache(path)
    assert cache.items and path in cache.items
    for img in (first, again):
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), np.asarray(rgb_loader(path)))
    Image.fromarray(scene(16, 16, seed=9)).save(path)  # replaced during the run
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime even on a coarse clock
    assert np.array_equal(np.asarray(cache(path)), scene(16, 16, seed=9))
    Path(path).write_bytes(b"broken")  # broken during the run: skipped, as without the cache
    with pytest.raises(UnreadableImage):
        cache(path)
    small = D.DecodedCache(max_bytes=16 * 16 * 3 * 2)  # room for two images
    for p_, _ in base.samples[:4]:
        small(p_)
    assert len(small.items) == 2 and small.used == 16 * 16 * 3 * 2
    big = D.image_folder(tiny_data, "train")
    big.samples = big.samples * (D.DecodedCache.MAX_IMAGES // len(big.samples) + 1)
    assert D.cache_small_dataset(big).loader is not None and not isinstance(big.loader, D.DecodedCache)
