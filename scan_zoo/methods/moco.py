"""MoCo-v2 (Chen et al. 2020): the label-free baseline and stage 0 of SCAN."""

from __future__ import annotations

import torch

from scan_zoo.methods.contrast import MomentumContrast


class MoCo(MomentumContrast):
    """Each query's one positive is the key of its own image's other view; the queue holds the negatives.

    Other keys of the current batch are not contrasted (as in MoCo's code: logits ``[l_pos, l_neg]``).
    """

    def masks(self, batch, keys):
        pos_b = batch["index"][:, None] == keys["index"][None, :]  # [B, Bg] own key
        neg_b = torch.zeros_like(pos_b)
        return pos_b, neg_b, None, None  # the queue: negatives of every query
