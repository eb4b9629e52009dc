"""``--decode device``: JPEG decoding and the two-crop augmentation run batched on the training device.

When the CPUs cannot decode and augment as fast as the accelerators train (ResNet-50 on ImageNet wants
several hundred images/s per GPU; a CPU core decodes and augments a few dozen), the loader workers only:

- read each file's encoded bytes, and its size from the header (PIL, nothing decoded), and
- draw the sample's augmentation parameters: the very draws the CPU pipeline makes, in its order, under
  the same per-sample seed (:func:`draw_plan` walks the same ``torchvision`` transform object), so a
  resumed run sees the same crops, and switching ``--decode`` keeps every random decision.

The training process then decodes the batch with ``torchvision.io.decode_jpeg(..., device=...)`` and
applies the plan as tensor operations on the device (:class:`DeviceViews`): per-sample resized crop, then
batched colour jitter, grayscale, Gaussian blur, flip and normalisation. The output differs from the PIL
pipeline's only by rounding (PIL rounds to 8 bits after every operation) and by PIL's own colour formulas.

Files that are not JPEG (the digit scenes are PNG) or JPEGs in CMYK/YCCK are decoded by the workers on the
CPU (:func:`scan_zoo.data.imageio.rgb_loader`, as with ``--decode cpu``); only their augmentation runs on the
device. A file PIL cannot open is skipped as with ``--decode cpu``; a JPEG the device decoder refuses is
decoded by PIL instead, and skipped only if PIL cannot decode it either.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

from scan_zoo.common.errors import UserError
from scan_zoo.data.imageio import (
    _DECODE_ERRORS,
    UnreadableImage,
    display_path,
    open_regular,
    rgb_loader,
)
from scan_zoo.data.transforms import MultiView, ToNormalizedTensor, gaussian_blur

logger = logging.getLogger(__name__)

DEVICE_JPEG_MODES = ("RGB", "L")  # JPEG colour modes torchvision.io decodes to RGB; others go through PIL
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe")
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision and PIL
_SUPPORTED = (
    T.RandomResizedCrop,
    T.RandomApply,
    T.ColorJitter,
    T.RandomGrayscale,
    T.GaussianBlur,
    T.RandomHorizontalFlip,
    T.ToTensor,
    T.Normalize,
    ToNormalizedTensor,
)


# ------------------------------------------------------------------------------------ the plan of a view
def _ops(transform) -> list:
    """The operations of a view transform (a ``T.Compose``), checked to be ones :class:`DeviceViews` can run."""
    ops = list(getattr(transform, "transforms", [transform]))
    flat = [t for op in ops for t in (op.transforms if isinstance(op, T.RandomApply) else [op])]
    unsupported = sorted({type(t).__name__ for t in flat if not isinstance(t, _SUPPORTED)})
    if unsupported:
        raise UserError(f"--decode device cannot run {', '.join(unsupported)} on the device; use --decode cpu")
    crops = [t for t in flat if isinstance(t, T.RandomResizedCrop)]
    if len(crops) != 1 or not isinstance(ops[0], T.RandomResizedCrop):
        raise UserError("--decode device needs a view transform that starts with its one RandomResizedCrop")
    return ops


def empty_plan(views: int) -> dict:
    """The plan of ``views`` views that change nothing but the crop: ``crop`` int64 [V, 4] (top, left, height,
    width); ``factors`` float32 [V, 4] (brightness, contrast, saturation, hue; identity 1, 1, 1, 0);
    ``order`` int64 [V, 4] (ColorJitter's random order of those four); ``gray``, ``flip`` bool [V];
    ``sigma`` float32 [V] (Gaussian blur, 0 = none)."""
    return {
        "crop": torch.zeros(views, 4, dtype=torch.long),
        "factors": torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(views, 1),
        "order": torch.arange(4).repeat(views, 1),
        "gray": torch.zeros(views, dtype=torch.bool),
        "sigma": torch.zeros(views),
        "flip": torch.zeros(views, dtype=torch.bool),
    }


def draw_plan(transform: MultiView, height: int, width: int) -> dict:
    """The random parameters ``transform`` draws for an image of ``height`` x ``width``, as :func:`empty_plan`.

    Every draw is the one the transform's own ``forward`` makes (same calls, same order, same global torch
    RNG), so under one seed the plan is exactly what the CPU pipeline applies.
    """
    view_tf = transform.transform if isinstance(transform, MultiView) else transform
    n = transform.n if isinstance(transform, MultiView) else 1
    ops = _ops(view_tf)
    plan = empty_plan(n)
    size = torch.empty(1, 1, 1).expand(3, height, width)  # stands in for the image: only its size is read
    for v in range(n):
        for op in ops:
            if isinstance(op, T.RandomApply):
                if op.p < torch.rand(1):
                    continue
                inner = op.transforms
            else:
                inner = [op]
            for t in inner:
                if isinstance(t, T.RandomResizedCrop):
                    plan["crop"][v] = torch.tensor(t.get_params(size, t.scale, t.ratio))
                elif isinstance(t, T.ColorJitter):
                    order, *factors = t.get_params(t.brightness, t.contrast, t.saturation, t.hue)
                    plan["order"][v] = order
                    for i, f in enumerate(factors):
                        if f is not None:
                            plan["factors"][v, i] = f
                elif isinstance(t, T.RandomGrayscale):
                    plan["gray"][v] = bool(torch.rand(1) < t.p)
                elif isinstance(t, T.GaussianBlur):
                    plan["sigma"][v] = t.get_params(t.sigma[0], t.sigma[1])
                elif isinstance(t, T.RandomHorizontalFlip):
                    plan["flip"][v] = bool(torch.rand(1) < t.p)
    return plan


# --------------------------------------------------------------------------------------- the workers' side
class EncodedViews(Dataset):
    """Item ``(index, aug_seed, group)`` -> ``(data, label, index, group, plan, path, skipped)`` for :class:`DeviceViews`.

    ``data`` is the file's bytes (uint8 [n]) for a JPEG the device can decode, otherwise the image decoded
    here (uint8 [3, H, W]); ``plan`` is :func:`draw_plan` under ``aug_seed`` (the caller's RNG is left as it
    was); ``skipped`` is None or why the file could not be read (``data`` is then None).
    """

    def __init__(self, base, transform: MultiView):
        self.base, self.transform = base, transform
        _ops(transform.transform if isinstance(transform, MultiView) else transform)  # fail now, not in a worker
        kinds = Counter(Path(p).suffix.lower() or "(none)" for p, _ in base.samples)
        other = {k: n for k, n in kinds.items() if k not in JPEG_SUFFIXES}
        if other:
            logger.info(
                "--decode device: %d of %d training images are not JPEG (%s): the loader workers decode "
                "them on the CPU, only their augmentation runs on the device",
                sum(other.values()),
                len(base.samples),
                ", ".join(f"{n} {k}" for k, n in sorted(other.items())),
            )

    def __len__(self) -> int:
        return len(self.base.samples)

    @property
    def targets(self) -> list:
        return self.base.targets

    def __getitem__(self, item):
        index, aug_seed, group = item if isinstance(item, tuple) else (item, item, item)
        path, label = self.base.samples[index]
        try:
            data, (height, width) = read_for_device(path)
        except UnreadableImage as e:
            return None, label, index, group, None, path, str(e)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(aug_seed)  # the CPU generator, as SeededViews
            plan = draw_plan(self.transform, height, width)
        return data, label, index, group, plan, path, None


def read_for_device(path: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(data, (height, width))``: the encoded bytes (uint8 [n]) of a JPEG torchvision.io decodes, else the
    image decoded here by PIL (uint8 [3, H, W]); :class:`UnreadableImage` if PIL cannot open it."""
    try:
        with open_regular(path) as f:  # a FIFO or device is refused, never read
            raw = f.read()
        with Image.open(io.BytesIO(raw)) as im:  # reads the header only
            fmt, mode, (width, height) = im.format, im.mode, im.size
    except _DECODE_ERRORS as e:
        raise UnreadableImage(path, f"{type(e).__name__}: {e}") from None
    if fmt == "JPEG" and mode in DEVICE_JPEG_MODES:
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8), (height, width)
    img = pil_to_tensor(rgb_loader(path))  # [3, H, W]
    return img, (img.shape[1], img.shape[2])


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # [3, H, W]


def collate_encoded(batch):
    """[(data, label, index, group, plan, path, skipped)] -> dict(data=[uint8 tensors], path=[str], label, index,
    group [B], every plan field stacked [B, V, ...], skipped=[reasons]); unreadable slots are dropped (none
    readable: ``dict(skipped, index=[])``, a step the training loop skips, as with data.collate_views)."""
    skipped = [b[6] for b in batch if b[6] is not None]
    batch = [b for b in batch if b[6] is None]
    if not batch:
        return {"skipped": skipped, "index": torch.empty(0, dtype=torch.long)}
    data, labels, index, group, plans, paths, _ = zip(*batch)
    out = {
        "skipped": skipped,
        "data": list(data),
        "path": list(paths),
        "label": torch.as_tensor(labels, dtype=torch.long),
        "index": torch.as_tensor(index, dtype=torch.long),
        "group": torch.as_tensor(group, dtype=torch.long),
    }
    out.update({k: torch.stack([p[k] for p in plans]) for k in plans[0]})
    return out


PLAN_KEYS = tuple(empty_plan(1))


# -------------------------------------------------------------------------------------- the device's side
def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] float -> [N, 1, H, W] luma."""
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, rgb_to_gray(x), f)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by ``f`` turns (in [-0.5, 0.5]), through HSV."""
    maxc, argmax = x.max(1)  # [N, H, W]
    minc = x.min(1).values
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = x.unbind(1)
    h = torch.where(argmax == 0, (g - b) / safe, torch.where(argmax == 1, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    h = torch.remainder(h / 6.0 + f.view(-1, 1, 1), 1.0)  # [N, H, W] hue in turns
    # back to RGB: channel c = v - v s clamp(min(k, 4 - k), 0, 1), k = (n_c + 6 h) mod 6, n = (5, 3, 1)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    return maxc.unsqueeze(1) * (1.0 - s.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))


JITTER = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # ColorJitter's fn_idx order
IDENTITY = (1.0, 1.0, 1.0, 0.0)


class DeviceViews:
    """Decodes a :func:`collate_encoded` batch on ``device`` and applies each sample's plan there.

    ``batch = DeviceViews(transform)(batch, device)`` replaces ``data``, ``path`` and the plan by ``views``
    (``V`` tensors float32 [B', 3, S, S] on ``device``, normalised), drops slots that could not be decoded
    (their reasons appended to ``skipped``) and their ``label``, ``index``, ``group`` with them.
    """

    def __init__(self, transform: MultiView):
        view_tf = transform.transform if isinstance(transform, MultiView) else transform
        ops = _ops(view_tf)
        flat = [t for op in ops for t in (op.transforms if isinstance(op, T.RandomApply) else [op])]
        crop = ops[0]
        self.size = list(crop.size)  # [S, S]
        self.interpolation, self.antialias = crop.interpolation, crop.antialias
        blur = [t for t in flat if isinstance(t, T.GaussianBlur)]
        self.kernel_size = blur[0].kernel_size[0] if blur else 0
        norm = [t for t in flat if isinstance(t, (T.Normalize, ToNormalizedTensor))]
        self.mean = norm[0].mean if norm else (0.0, 0.0, 0.0)
        self.std = norm[0].std if norm else (1.0, 1.0, 1.0)
        self.views = transform.n if isinstance(transform, MultiView) else 1

    # ---------------------------------------------------------------------------------------- decoding
    def decode(self, data: list, paths: list, device) -> tuple[list, list]:
        """uint8 [3, H, W] images on ``device`` (None where undecodable) and the reasons for those."""
        device = torch.device(device)
        images: list = [None] * len(data)
        reasons = []
        encoded = [i for i, d in enumerate(data) if d.ndim == 1]
        for i, d in enumerate(data):
            if d.ndim == 3:  # decoded by the worker
                images[i] = d.to(device, non_blocking=True)
        if encoded:
            try:
                out = decode_jpeg([data[i] for i in encoded], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # find the culprit(s): one at a time, then PIL for what the device refuses
                out = []
                for i in encoded:
                    try:
                        out.append(decode_jpeg(data[i], mode=ImageReadMode.RGB, device=device))
                    except RuntimeError as e:
                        try:
                            img = Image.open(io.BytesIO(data[i].numpy().tobytes()))
                            img.load()
                            out.append(pil_to_tensor(img.convert("RGB")).to(device))
                            logger.warning(
                                "%s: the device's JPEG decoder failed (%s); decoded by PIL", display_path(paths[i]), e
                            )
                        except _DECODE_ERRORS as e2:
                            out.append(None)
                            reasons.append(str(UnreadableImage(paths[i], f"{type(e2).__name__}: {e2}")))
            for i, img in zip(encoded, out):
                images[i] = img
        return images, reasons

    # ------------------------------------------------------------------------------------ augmentation
    def crops(self, images: list, crop: torch.Tensor) -> torch.Tensor:
        """Per image and view: resized crop (torchvision, antialiased) -> uint8 [V B, 3, S, S], view-major."""
        out = []
        for v in range(crop.shape[1]):
            for img, box in zip(images, crop[:, v].tolist()):
                out.append(F.resized_crop(img, *box, self.size, self.interpolation, antialias=self.antialias))
        return torch.stack(out)

    def augment(self, x: torch.Tensor, plan: dict) -> torch.Tensor:
        """Jitter, grayscale, blur, flip and normalise a float [N, 3, S, S] batch in [0, 1]; plan fields [N, ...]."""
        device = x.device
        factors = plan["factors"].to(device)
        changes = plan["factors"] != torch.tensor(IDENTITY)  # [N, 4] on the CPU: no device sync for indices
        for pos in range(4):  # ColorJitter applies its four operations in a random order per image
            for op in range(4):
                sel = torch.nonzero((plan["order"][:, pos] == op) & changes[:, op]).flatten()
                if len(sel):
                    sel = sel.to(device)
                    x[sel] = JITTER[op](x[sel], factors[sel, op])
        gray = torch.nonzero(plan["gray"]).flatten()
        if len(gray):
            gray = gray.to(device)
            x[gray] = rgb_to_gray(x[gray]).expand(-1, 3, -1, -1)
        blur = torch.nonzero(plan["sigma"] > 0).flatten()
        if len(blur):
            sigma = plan["sigma"][blur].to(device)
            blur = blur.to(device)
            x[blur] = gaussian_blur(x[blur], self.kernel_size, sigma)
        x = torch.where(plan["flip"].to(device).view(-1, 1, 1, 1), x.flip(-1), x)
        mean = torch.tensor(self.mean, device=device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, batch: dict, device) -> dict:
        images, reasons = self.decode(batch.pop("data"), batch.pop("path"), device)
        plan = {k: batch.pop(k) for k in PLAN_KEYS}
        keep = [i for i, img in enumerate(images) if img is not None]
        if reasons:
            batch["skipped"] = list(batch.get("skipped", [])) + reasons
            if not keep:  # nothing to decode: a step the training loop skips (data.collate_views)
                return {"skipped": batch["skipped"], "index": batch["index"][:0]}
            idx = torch.tensor(keep)
            images = [images[i] for i in keep]
            plan = {k: v[idx] for k, v in plan.items()}
            for k in ("label", "index", "group"):
                batch[k] = batch[k][idx]
        b = len(images)
        flat = {k: v.transpose(0, 1).reshape(b * self.views, *v.shape[2:]) for k, v in plan.items()}  # view-major
        x = self.crops(images, plan["crop"]).float().div_(255.0)  # [V B, 3, S, S]
        x = self.augment(x, flat)
        batch["views"] = list(x.split(b))  # V x [B, 3, S, S]
        return batch
