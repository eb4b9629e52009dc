"""Fully supervised cross-entropy (the paper's FSup-Softmax row): a linear classifier on pooled features."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from scan_zoo.models.backbones import pooled_dim


class Supervised(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = backbone
        self.classifier = nn.Linear(pooled_dim(backbone), num_classes)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder

    def forward(self, batch: dict) -> dict:
        logits = self.classifier(self.encoder(batch["views"][0]))  # [B, C]
        loss = F.cross_entropy(logits.float(), batch["label"])
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        return {"loss": loss, "acc": acc.detach()}
