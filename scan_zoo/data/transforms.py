"""The image transforms: MoCo-v2's augmentation, the supervised one, evaluation's resize + centre crop.

MoCo-v2's Gaussian blur is computed separably as torchvision's ``F.gaussian_blur`` does, so the same
kernel serves PIL images in the loader workers and batched tensors on the training device
(:mod:`scan_zoo.data.device`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------- transforms
def gaussian_kernels(kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """[N] sigmas -> [N, kernel_size] normalised 1-D Gaussian kernels (torchvision's, truncated at the kernel size)."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=sigma.dtype)
    return torch.softmax(-0.5 * (t[None, :] / sigma[:, None]) ** 2, dim=1)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Blur image i of float [N, C, H, W] with sigma[i]: torchvision's filter (reflect padding) as two 1-D passes."""
    n, c, h, w = x.shape
    k = gaussian_kernels(kernel_size, sigma.to(x.dtype)).repeat_interleave(c, 0)  # [N C, k]
    pad = kernel_size // 2
    y = torch.nn.functional.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = torch.nn.functional.conv2d(y, k.view(n * c, 1, 1, kernel_size), groups=n * c)  # along W
    y = torch.nn.functional.conv2d(y, k.view(n * c, 1, kernel_size, 1), groups=n * c)  # along H
    return y.view(n, c, h, w)


def gaussian_blur_image(img, kernel_size: int, sigma: float):
    """One PIL image (or uint8/float tensor [C, H, W]) blurred as torchvision's ``F.gaussian_blur`` does, separably."""
    t = img if isinstance(img, torch.Tensor) else F.pil_to_tensor(img)
    out = gaussian_blur(t[None].float(), kernel_size, torch.tensor([float(sigma)]))[0]  # [C, H, W]
    if not t.is_floating_point():
        out = out.round_().to(t.dtype)
    return out if isinstance(img, torch.Tensor) else F.to_pil_image(out, mode=img.mode)


class GaussianBlur(T.GaussianBlur):
    """torchvision's GaussianBlur (same options, same random draw of sigma), filtering in two 1-D passes.

    On a PIL image torchvision convolves with the full k x k kernel: at 224 px (k = 23) that was half of a
    loader worker's time (benchmarks/data.py --profile); two passes cost 2k instead of k^2 per pixel and give
    the same image up to rounding.
    """

    def forward(self, img):
        assert self.kernel_size[0] == self.kernel_size[1], "square kernels only"
        return gaussian_blur_image(img, self.kernel_size[0], self.get_params(self.sigma[0], self.sigma[1]))


class ToNormalizedTensor:
    """``T.ToTensor()`` then ``T.Normalize(mean, std)`` as one step: the same float32 arithmetic
    ``(x / 255 - mean) / std``, bit for bit, without two transforms' overhead per call (on a 32-px digit view the
    two cost about 0.1 ms, a sixth of the view's work)."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(mean), tuple(std)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, pic) -> torch.Tensor:
        if isinstance(pic, Image.Image) and pic.mode in ("RGB", "L"):
            a = np.array(pic, dtype=np.uint8)
            x = torch.from_numpy(a.reshape(a.shape[0], a.shape[1], -1)).permute(2, 0, 1).contiguous()  # [C, H, W]
            x = x.to(torch.float32).div(255)
        else:  # other modes: torchvision's own conversion (a tensor is refused there, as by T.ToTensor)
            x = F.to_tensor(pic)
        return x.sub_(self._mean).div_(self._std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def moco_v2_transform(
    size: int,
    crop_scale_min: float = 0.2,
    blur_prob: float = 0.5,
    hflip: bool = True,
    jitter_hue: float = 0.1,
    grayscale_prob: float = 0.2,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> T.Compose:
    """MoCo-v2 augmentation, with the blur kernel scaled to the image size (23 px at 224, as in SimCLR).

    Defaults are MoCo-v2's; ``jitter_hue`` and ``grayscale_prob`` let data whose colours are random per
    image (the digit scenes) take colour away as an instance cue.
    """
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    ops = [
        T.RandomResizedCrop(size, scale=(crop_scale_min, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, jitter_hue)], p=0.8),
        T.RandomGrayscale(p=grayscale_prob),
        T.RandomApply([GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_prob),
    ]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    ops.append(ToNormalizedTensor(mean, std))
    return T.Compose(ops)


def supervised_transform(
    size: int, crop_scale_min: float = 0.08, hflip: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> T.Compose:
    """The standard supervised training augmentation: random resized crop and flip."""
    ops = [T.RandomResizedCrop(size, scale=(crop_scale_min, 1.0))]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops + [ToNormalizedTensor(mean, std)])


def eval_transform(size: int, resize: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """Resize (default size / 0.875, i.e. 256 for 224) then centre crop."""
    resize = resize or int(round(size / 0.875))
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


class MultiView:
    """Apply ``transform`` ``n`` times: the two views of contrastive learning."""

    def __init__(self, transform, n: int = 2):
        self.transform, self.n = transform, n

    def __call__(self, img):
        return [self.transform(img) for _ in range(self.n)]
