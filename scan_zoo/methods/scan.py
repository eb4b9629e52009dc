"""SCAN: Supervised Contrastive Adjustment in Neighborhood (Wei et al. 2020). Not SCAN clustering
(Van Gansbeke et al. 2020).

Stage 2: MoCo-v2 training in which each image's positives are its K nearest same-class neighbours
(mined in stage 1, :mod:`scan_zoo.core.neighbors`). The sampler puts every anchor's neighbours in its batch
and gives anchor and neighbours one pseudo-label y*; the loss is paper Eq. 5-6.
"""

from __future__ import annotations

from scan_zoo.core.losses import contrast_masks
from scan_zoo.methods.contrast import MomentumContrast


class SCAN(MomentumContrast):
    """Positives of query i: batch keys with the same pseudo-label y* or of the same image (its own key
    included). Queue entries are always negatives.

    Args (beyond :class:`MomentumContrast`):
        denominator: ``"all"`` (default; positives in the softmax denominator, the form that reduces to
            MoCo at K = 0 and SupCon at K = infinity) or ``"negatives"`` (Eq. 6 read literally).
        in_batch_negatives: batch keys of other pseudo-classes are negatives (Eq. 6). With K = 0 and
            this off, SCAN is exactly MoCo.
    """

    def __init__(self, backbone, denominator: str = "all", in_batch_negatives: bool = True, **kwargs):
        super().__init__(backbone, **kwargs)
        self.denominator, self.in_batch_negatives = denominator, in_batch_negatives

    def masks(self, batch, keys):
        pos_b, neg_b = contrast_masks(
            batch["index"], keys["index"], batch["group"], keys["group"], self.in_batch_negatives
        )  # [B, Bg] each
        return pos_b, neg_b, None, None  # the queue: negatives of every query
