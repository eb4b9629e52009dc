"""The machinery MoCo, SupCon and SCAN share: query encoder, momentum key encoder, labelled queue.

A subclass only says which keys are positives and which are negatives (:meth:`masks`); the loss is
always :func:`scan_zoo.losses.masked_info_nce` over ``[batch keys of every process] ++ [queue]``.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed as D
from ..losses import masked_info_nce
from ..models import pooled_dim
from .blocks import Encoder, LabeledQueue, ProjectionHead, momentum_copy, update_momentum


class MomentumContrast(nn.Module):
    """Query encoder ``f``, key encoder ``g`` (momentum copy of ``f``) and a queue of ``g``'s keys.

    ``forward(batch)`` takes ``views`` (two tensors ``[B, 3, H, W]``), ``index``, ``label`` and ``group``
    (``[B]`` each), returns ``{"loss", ...}`` and, in training, updates ``g`` and the queue.
    """

    #: softmax denominator of :func:`masked_info_nce`; SCAN makes it an option
    denominator = "all"

    def __init__(self, backbone: nn.Module, proj_dim: int = 128, queue_size: int = 65536,
                 temperature: float = 0.2, key_momentum: float = 0.999, shuffle_bn: bool = True,
                 key_bn_splits: int = 2, seed: int = 0):
        super().__init__()
        self.encoder_q = Encoder(backbone, ProjectionHead(pooled_dim(backbone), proj_dim))
        self.encoder_k = momentum_copy(self.encoder_q)
        self.queue = LabeledQueue(queue_size, proj_dim, seed=seed)
        self.temperature, self.key_momentum = temperature, key_momentum
        self.shuffle_bn, self.key_bn_splits, self.seed = shuffle_bn, key_bn_splits, seed
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training steps taken; seeds shuffle-BN

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q.backbone

    def masks(self, batch: dict, keys: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pos_batch [B, Bg], neg_batch [B, Bg], pos_queue [B, L], neg_queue [B, L]) bool."""
        raise NotImplementedError

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys from the momentum encoder, its BatchNorm statistics kept apart from the queries' batch.

        Several processes: MoCo's shuffle-BN (the global batch shuffled across processes). One process:
        the batch is shuffled and encoded in ``key_bn_splits`` sub-batches, so the keys' BN statistics
        come from other groups of images than the queries' (the single-GPU form, as in MoCo's CIFAR demo).
        """
        if not self.shuffle_bn:
            return self.encoder_k(x)  # [B, D]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.steps))
        if D.world_size() > 1:
            x, idx_unshuffle, sizes = D.shuffle_across(x, g)
            return D.unshuffle_across(self.encoder_k(x), idx_unshuffle, sizes)
        perm = torch.randperm(len(x), generator=g).to(x.device)  # [B]
        splits = max(1, min(self.key_bn_splits, len(x) // 2))  # BatchNorm needs 2+ samples per split
        k = torch.cat([self.encoder_k(chunk) for chunk in x[perm].tensor_split(splits)])  # [B, D] shuffled
        return k[torch.argsort(perm)]

    def forward(self, batch: dict) -> dict:
        x_q, x_k = batch["views"][0], batch["views"][1]
        q = self.encoder_q(x_q)  # [B, D] queries, L2-normalised
        with torch.no_grad():
            if self.training:
                update_momentum(self.encoder_q, self.encoder_k, self.key_momentum)
            k = self._keys(x_k)  # [B, D] keys of this process
            sizes = D.gather_sizes(len(k), k.device)
            k_all = D.gather_cat(k, sizes)  # [Bg, D] keys of the global batch
            ids = torch.stack([batch["index"], batch["label"], batch["group"]], 1)  # [B, 3]
            ids_all = D.gather_cat(ids, sizes)  # [Bg, 3]
        keys = {"index": ids_all[:, 0], "label": ids_all[:, 1], "group": ids_all[:, 2],
                "queue_label": self.queue.labels}
        pos_b, neg_b, pos_q, neg_q = self.masks(batch, keys)
        with torch.autocast(device_type=q.device.type, enabled=False):  # logits in float32 under bf16/fp16
            l_batch = q.float() @ k_all.float().T  # [B, Bg]
            l_queue = q.float() @ self.queue.keys.clone().detach().float().T  # [B, L]
            logits = torch.cat([l_batch, l_queue], 1) / self.temperature  # [B, Bg + L]
        loss = masked_info_nce(logits, torch.cat([pos_b, pos_q], 1), torch.cat([neg_b, neg_q], 1),
                               self.denominator)
        if self.training:
            with torch.no_grad():
                self.queue.push(k_all, keys["label"])
                self.steps += 1
        return {"loss": loss, "positives": pos_b.sum(1).float().mean().detach()}
