"""Small building blocks shared by the methods: projection head, encoder, momentum update, labelled queue."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """MoCo-v2's MLP head: ``Linear(d, d) -> ReLU -> Linear(d, out)``, no BatchNorm.

    "we replace the fc head in MoCo with a 2-layer MLP head (hidden layer 2048-d, with ReLU)"
    (Chen et al., Improved Baselines with Momentum Contrastive Learning, 2020).
    """

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class DenseProjectionHead(nn.Module):
    """DenseCL's dense head: ``Conv1x1(c, c) -> ReLU -> Conv1x1(c, out)`` on a feature map, no BatchNorm.

    "the dense projection head ... [is] the same as the global one except that [the] global pooling layer is
    removed and the MLP replaced by identical 1x1 convolution layers" (Wang et al., Dense Contrastive Learning
    for Self-Supervised Visual Pre-Training, 2021): hidden width = input channels, output 128.
    """

    def __init__(self, in_channels: int, out_dim: int = 128, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or in_channels
        self.conv1 = nn.Conv2d(in_channels, hidden_dim, 1)
        self.conv2 = nn.Conv2d(hidden_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)))


class Encoder(nn.Module):
    """Backbone (pooled features) + projection head, output L2-normalised: ``[B, out_dim]``."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy: the momentum (key) encoder, never trained by gradient."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def update_momentum(online: nn.Module, target: nn.Module, m: float) -> None:
    """``theta_target <- m * theta_target + (1 - m) * theta_online`` (parameters only; buffers are the target's own)."""
    for p_t, p_o in zip(target.parameters(), online.parameters()):
        p_t.mul_(m).add_(p_o.detach(), alpha=1.0 - m)


class LabeledQueue(nn.Module):
    """FIFO of the last ``size`` keys with their labels; all state in buffers, so it is checkpointed.

    Labels are class ids (SupCon uses them: same-class entries are positives); ``-1`` marks entries with
    no label (the random initial keys). Writes wrap around, so any batch size works.
    """

    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=g), dim=1))  # [L, D]
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))  # [L]
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def push(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Enqueue ``keys [n, D]`` and ``labels [n]``, overwriting the oldest entries."""
        n = keys.shape[0]
        if n > self.size:
            keys, labels, n = keys[-self.size :], labels[-self.size :], self.size
        idx = (self.ptr + torch.arange(n, device=self.keys.device)) % self.size  # [n]
        self.keys[idx] = keys.to(self.keys.dtype)
        self.labels[idx] = labels.to(self.labels.dtype)
        self.ptr.copy_((self.ptr + n) % self.size)
