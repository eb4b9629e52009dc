"""Supervised contrastive learning (Khosla et al. 2020, L_out) with MoCo's key encoder and a labelled queue."""

from __future__ import annotations

from scan_zoo.methods.contrast import MomentumContrast


class SupCon(MomentumContrast):
    """Positives: every key of the same class, in the batch and in the queue (the K = infinity limit of SCAN).

    The queue keeps each key's label: with few classes a label-blind queue would push apart 1/C of all
    pairs that should be pulled together. Random initial queue entries (label -1) are negatives.
    """

    def masks(self, batch, keys):
        label = batch["label"]
        pos_b = (label[:, None] == keys["label"][None, :]) | (batch["index"][:, None] == keys["index"][None, :])
        pos_q = label[:, None] == keys["queue_label"][None, :]  # [B, L]
        return pos_b, ~pos_b, pos_q, ~pos_q
