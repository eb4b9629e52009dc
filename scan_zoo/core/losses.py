"""Loss functions: pure functions of tensors (no state, no I/O, no distributed calls).

One masked InfoNCE serves MoCo, supervised contrastive learning and SCAN: they differ only in which
logits are positives and which are negatives. Each method builds its masks; this module does the maths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_info_nce(
    logits: torch.Tensor,
    pos_mask: torch.Tensor,
    neg_mask: torch.Tensor | None = None,
    denominator: str = "all",
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-positive InfoNCE, averaged over the anchors that have at least one positive.

    For anchor i with positive set P(i) and negative set N(i) (entries in neither are ignored):

    - ``denominator="all"`` (SupCon's L_out; MoCo when |P(i)| = 1):
      ``L_i = -1/|P(i)| sum_{p in P(i)} log( exp(l_ip) / sum_{a in P(i) u N(i)} exp(l_ia) )``
    - ``denominator="negatives"`` (SCAN Eq. 5-6 read literally, positives left out of the sum as in
      decoupled contrastive learning):
      ``L_i = -1/|P(i)| sum_{p in P(i)} log( exp(l_ip) / sum_{n in N(i)} exp(l_in) )``

    Anchors without a positive (or with an empty denominator) get zero weight, never NaN; if no anchor
    has one the loss is an exact zero that still depends on ``logits``, so backward works.

    Args:
        logits: ``[B, M]`` similarities already divided by the temperature.
        pos_mask: ``[B, M]`` bool, True where entry j is a positive of anchor i.
        neg_mask: ``[B, M]`` bool, True where entry j is a negative of anchor i; default ``~pos_mask``.
            An entry may not be both.
        denominator: ``"all"`` or ``"negatives"``.
        negatives: optional ``[B, L]`` logits that are negatives of every anchor (MoCo's and SCAN's queue):
            the loss of ``torch.cat([logits, negatives], 1)`` with those columns negative everywhere, computed
            without building ``[B, M + L]`` masks and log-probabilities (with L = 65,536 that was 15 % of a
            MoCo step on the CPU benchmark, ``benchmarks/RESULTS.md``).
    Returns:
        scalar loss (float32 whatever the logits' dtype).
    """
    if logits.shape != pos_mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and pos_mask {tuple(pos_mask.shape)} differ in shape")
    if denominator not in ("all", "negatives"):
        raise ValueError(f"denominator must be 'all' or 'negatives', not {denominator!r}")
    logits = logits.float()
    pos_mask = pos_mask.bool()
    neg_mask = ~pos_mask if neg_mask is None else neg_mask.bool()
    if (pos_mask & neg_mask).any():
        raise ValueError("an entry cannot be both a positive and a negative")
    in_denominator = (pos_mask | neg_mask) if denominator == "all" else neg_mask
    neg_inf = torch.finfo(logits.dtype).min
    log_z = torch.logsumexp(logits.masked_fill(~in_denominator, neg_inf), dim=1, keepdim=True)  # [B, 1]
    has_denominator = in_denominator.any(1)  # [B]
    if negatives is not None:
        if negatives.shape[0] != logits.shape[0]:
            raise ValueError(f"negatives {tuple(negatives.shape)} and logits {tuple(logits.shape)} differ in rows")
        negatives = negatives.float()
        if negatives.shape[1]:
            log_z = torch.logaddexp(log_z, torch.logsumexp(negatives, dim=1, keepdim=True))  # [B, 1]
            has_denominator = torch.ones_like(has_denominator)
    log_prob = logits - log_z  # [B, M]
    num_pos = pos_mask.sum(1)  # [B]
    has_pos = (num_pos > 0) & has_denominator  # [B] anchors that contribute
    per_anchor = -(log_prob * pos_mask).sum(1) / num_pos.clamp(min=1)  # [B]
    if not has_pos.any():
        return (logits * 0.0).sum() + (0.0 if negatives is None else (negatives * 0.0).sum())
    return per_anchor[has_pos].mean()


def moco_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's loss exactly as its authors write it: logits ``[l_pos, l_neg]``, cross-entropy on class 0.

    Args: q ``[B, D]`` queries, k ``[B, D]`` their keys, queue ``[L, D]``; all L2-normalised.
    Kept as a readable reference; the methods use :func:`masked_info_nce`.
    """
    l_pos = (q * k).sum(1, keepdim=True)  # [B, 1]
    l_neg = q @ queue.T  # [B, L]
    logits = torch.cat([l_pos, l_neg], 1) / temperature  # [B, 1 + L]
    return F.cross_entropy(logits.float(), torch.zeros(len(q), dtype=torch.long, device=q.device))


def contrast_masks(
    index_q: torch.Tensor,
    index_k: torch.Tensor,
    group_q: torch.Tensor | None,
    group_k: torch.Tensor | None,
    in_batch_negatives: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative masks over the batch keys.

    Two slots are positives when they are the same image (``index``) or share a group (pseudo-label
    y* for SCAN, class for SupCon; ``None`` for MoCo). Every other batch key is a negative when
    ``in_batch_negatives``, else ignored.

    Returns ``(pos [Bq, Bk], neg [Bq, Bk])`` bool.
    """
    pos = index_q[:, None] == index_k[None, :]  # [Bq, Bk]
    if group_q is not None:
        pos = pos | (group_q[:, None] == group_k[None, :])
    neg = ~pos if in_batch_negatives else torch.zeros_like(pos)
    return pos, neg
