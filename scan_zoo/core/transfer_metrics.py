"""The transfer suite's scores and its ridge regression: pure functions of tensors.

Box IoU with exclusive ends, dataset-level mIoU from one confusion matrix, R^2 per target (scikit-learn's
``r2_score``), and closed-form ridge regression with its lambda chosen on held-out rows. The choices are
described task by task in :mod:`scan_zoo.eval.transfer`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


# ------------------------------------------------------------------------------------------- metrics
def box_iou(pred, target) -> torch.Tensor:
    """IoU of matching boxes ``[N, 4]`` ``(x0, y0, x1, y1)`` with exclusive ends: ``[N]`` in [0, 1].

    Area is ``(x1 - x0) * (y1 - y0)`` (negative extents count as 0). Two empty boxes have IoU 0.
    """
    p = torch.as_tensor(pred, dtype=torch.float64)
    t = torch.as_tensor(target, dtype=torch.float64)
    assert p.shape == t.shape and p.shape[-1] == 4, "boxes are [N, 4] (x0, y0, x1, y1), one prediction per target"
    iw = (torch.minimum(p[:, 2], t[:, 2]) - torch.maximum(p[:, 0], t[:, 0])).clamp(min=0)  # [N]
    ih = (torch.minimum(p[:, 3], t[:, 3]) - torch.maximum(p[:, 1], t[:, 1])).clamp(min=0)
    inter = iw * ih
    area_p = (p[:, 2] - p[:, 0]).clamp(min=0) * (p[:, 3] - p[:, 1]).clamp(min=0)
    area_t = (t[:, 2] - t[:, 0]).clamp(min=0) * (t[:, 3] - t[:, 1]).clamp(min=0)
    union = area_p + area_t - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def confusion_matrix(pred, target, num_classes: int) -> torch.Tensor:
    """``[C, C]`` int64 counts, rows = true class, columns = predicted class, over every element."""
    p = torch.as_tensor(pred).long().reshape(-1)
    t = torch.as_tensor(target).long().reshape(-1)
    assert p.shape == t.shape, "one prediction per target pixel"
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def mean_iou(pred, target, num_classes: int = 2) -> tuple[float, list[float]]:
    """Dataset-level mIoU: ``(mean over classes, [IoU per class])`` from one confusion matrix over all pixels.

    IoU of class c = TP / (TP + FP + FN). A class absent from both prediction and target (union 0) is
    NaN and left out of the mean.
    """
    cm = confusion_matrix(pred, target, num_classes).double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp  # [C] predicted + true - both
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    present = ~torch.isnan(iou)
    miou = iou[present].mean().item() if present.any() else float("nan")
    return miou, iou.tolist()


def r2_score(pred, target) -> torch.Tensor:
    """Coefficient of determination per target column: ``1 - SS_res / SS_tot`` (``[T]``; NaN where the
    target is constant). Same definition as scikit-learn's ``r2_score(..., multioutput='raw_values')``."""
    p = torch.as_tensor(pred, dtype=torch.float64)
    t = torch.as_tensor(target, dtype=torch.float64)
    if t.ndim == 1:
        p, t = p[:, None], t[:, None]
    assert p.shape == t.shape, "one prediction per target"
    ss_res = ((t - p) ** 2).sum(0)
    ss_tot = ((t - t.mean(0)) ** 2).sum(0)
    return torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp(min=1e-300), torch.full_like(ss_tot, float("nan")))


# --------------------------------------------------------------------------------------------- ridge
def standardiser(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [D], std [D])`` of the rows of ``x``; constant columns get std 1 (they stay 0 after centring)."""
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return mean, torch.where(std > eps, std, torch.ones_like(std))


def ridge_fit(x: torch.Tensor, y: torch.Tensor, lambdas: Sequence[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Closed-form ridge for several lambdas: ``[(W [D, T], b [T])]`` minimising
    ``|y - x W - b|^2 + lambda |W|^2`` (intercept unpenalised). One eigendecomposition of the centred
    Gram matrix serves every lambda."""
    x = x.double()
    y = y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    evals, evecs = torch.linalg.eigh(xc.T @ xc)  # [D], [D, D]
    proj = evecs.T @ (xc.T @ yc)  # [D, T]
    out = []
    for lam in lambdas:
        w = evecs @ (proj / (evals.clamp(min=0) + lam)[:, None])  # [D, T]
        out.append((w, my - mx @ w))
    return out


def ridge_select(
    x_fit: torch.Tensor, y_fit: torch.Tensor, x_hold: torch.Tensor, y_hold: torch.Tensor, alphas: Sequence[float]
) -> tuple[float, list[float]]:
    """``(best alpha, mean held-out R^2 per alpha)``, lambda = alpha * rows of ``x_fit``."""
    fits = ridge_fit(x_fit, y_fit, [a * len(x_fit) for a in alphas])
    scores = [float(torch.nan_to_num(r2_score(x_hold.double() @ w + b, y_hold), nan=0.0).mean()) for w, b in fits]
    return float(alphas[int(np.argmax(scores))]), scores
