"""The machinery MoCo, SupCon and SCAN share: query encoder, momentum key encoder, labelled queue.

A subclass only says which keys are positives and which are negatives (:meth:`masks`); the loss is
always :func:`scan_zoo.core.losses.masked_info_nce` over ``[batch keys of every process] ++ [queue]``.
"""

from __future__ import annotations

import torch
from torch import nn

from scan_zoo.common import distributed as D
from scan_zoo.core.losses import masked_info_nce
from scan_zoo.methods.blocks import (
    Encoder,
    LabeledQueue,
    ProjectionHead,
    momentum_copy,
    update_momentum,
)
from scan_zoo.models.backbones import pooled_dim


class MomentumContrast(nn.Module):
    """Query encoder ``f``, key encoder ``g`` (momentum copy of ``f``) and a queue of ``g``'s keys.

    ``forward(batch)`` takes ``views`` (two tensors ``[B, 3, H, W]``), ``index``, ``label`` and ``group``
    (``[B]`` each), returns ``{"loss", ...}`` and, in training, updates ``g`` and the queue.
    """

    #: softmax denominator of :func:`masked_info_nce`; SCAN makes it an option
    denominator = "all"

    def __init__(
        self,
        backbone: nn.Module,
        proj_dim: int = 128,
        queue_size: int = 65536,
        temperature: float = 0.2,
        key_momentum: float = 0.999,
        shuffle_bn: bool = True,
        key_bn_splits: int = 2,
        seed: int = 0,
        encoder: nn.Module | None = None,
    ):
        """``encoder``: the query encoder, holding ``backbone`` as ``.backbone`` and its global projection head
        as ``.head`` (default: :class:`Encoder` with the MoCo-v2 MLP head); the key encoder is its momentum copy."""
        super().__init__()
        self.encoder_q = (
            encoder if encoder is not None else Encoder(backbone, ProjectionHead(pooled_dim(backbone), proj_dim))
        )
        assert self.encoder_q.backbone is backbone, "the query encoder must hold the backbone it is given"
        self.encoder_k = momentum_copy(self.encoder_q)
        self.queue = LabeledQueue(queue_size, proj_dim, seed=seed)
        self.temperature, self.key_momentum = temperature, key_momentum
        self.shuffle_bn, self.key_bn_splits, self.seed = shuffle_bn, key_bn_splits, seed
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training steps taken; seeds shuffle-BN

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q.backbone

    def masks(self, batch: dict, keys: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pos_batch [B, Bg], neg_batch [B, Bg], pos_queue [B, L], neg_queue [B, L]) bool; the queue's two
        may be ``None``: every queue entry is a negative of every anchor (no ``[B, L]`` masks are built)."""
        raise NotImplementedError

    @torch.no_grad()
    def _keys(self, x: torch.Tensor):
        """Keys from the momentum encoder, its BatchNorm statistics kept apart from the queries' batch.

        Several processes: MoCo's shuffle-BN (the global batch shuffled across processes). One process:
        the batch is shuffled and encoded in ``key_bn_splits`` sub-batches, so the keys' BN statistics
        come from other groups of images than the queries' (the single-GPU form, as in MoCo's CIFAR demo).
        Returns what ``encoder_k`` returns (a tensor ``[B, D]``, or a tuple of tensors ``[B, ...]``), rows in
        the order of ``x``.
        """
        if not self.shuffle_bn:
            return self.encoder_k(x)  # [B, D]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.steps))
        if D.world_size() > 1:
            x, idx_unshuffle, sizes = D.shuffle_across(x, g)
            return _each(self.encoder_k(x), lambda y: D.unshuffle_across(y, idx_unshuffle, sizes))
        perm = torch.randperm(len(x), generator=g).to(x.device)  # [B]
        splits = max(1, min(self.key_bn_splits, len(x) // 2))  # BatchNorm needs 2+ samples per split
        chunks = [self.encoder_k(chunk) for chunk in x[perm].tensor_split(splits)]
        unshuffle = torch.argsort(perm)
        if isinstance(chunks[0], tuple):
            return tuple(torch.cat(parts)[unshuffle] for parts in zip(*chunks))  # each [B, ...]
        return torch.cat(chunks)[unshuffle]  # [B, D]

    def forward(self, batch: dict) -> dict:
        x_q, x_k = batch["views"][0], batch["views"][1]
        q = self.encoder_q(x_q)  # [B, D] queries, L2-normalised
        with torch.no_grad():
            if self.training:
                update_momentum(self.encoder_q, self.encoder_k, self.key_momentum)
            k = self._keys(x_k)  # [B, D] keys of this process
        loss, keys, pos_b = self._contrast(batch, q, k)
        if self.training:
            with torch.no_grad():
                self.queue.push(keys["keys"], keys["label"])
                self.steps += 1
        return {"loss": loss, "positives": pos_b.sum(1).float().mean().detach()}

    def _contrast(self, batch: dict, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """The loss of queries ``q [B, D]`` against the keys of every process (``k [B, D]`` are this
        process's) and the queue, with the positives and negatives of :meth:`masks`; changes no state.

        Returns ``(loss, keys, pos_batch [B, Bg])``; ``keys`` holds the global batch's ``keys [Bg, D]``,
        ``index``, ``label``, ``group`` ``[Bg]``, ``sizes`` (rows per process) and ``queue_label [L]``.
        """
        with torch.no_grad():
            sizes = D.gather_sizes(len(k), k.device)
            k_all = D.gather_cat(k, sizes)  # [Bg, D] keys of the global batch
            ids = torch.stack([batch["index"], batch["label"], batch["group"]], 1)  # [B, 3]
            ids_all = D.gather_cat(ids, sizes)  # [Bg, 3]
        keys = {
            "keys": k_all,
            "index": ids_all[:, 0],
            "label": ids_all[:, 1],
            "group": ids_all[:, 2],
            "sizes": sizes,
            "queue_label": self.queue.labels,
        }
        pos_b, neg_b, pos_q, neg_q = self.masks(batch, keys)
        with torch.autocast(device_type=q.device.type, enabled=False):  # logits in float32 under bf16/fp16
            q_t = q.float() / self.temperature  # [B, D] 1/tau applied to D columns, not to Bg + L logits
            l_batch = q_t @ k_all.float().T  # [B, Bg]
            l_queue = q_t @ self.queue.keys.clone().detach().float().T  # [B, L]
        if pos_q is None:  # a queue of negatives only (MoCo, SCAN)
            loss = masked_info_nce(l_batch, pos_b, neg_b, self.denominator, negatives=l_queue)
        else:
            loss = masked_info_nce(
                torch.cat([l_batch, l_queue], 1),
                torch.cat([pos_b, pos_q], 1),
                torch.cat([neg_b, neg_q], 1),
                self.denominator,
            )
        return loss, keys, pos_b


def _each(out, fn):
    """``fn`` applied to a tensor, or to each tensor of a tuple."""
    return tuple(fn(t) for t in out) if isinstance(out, tuple) else fn(out)
