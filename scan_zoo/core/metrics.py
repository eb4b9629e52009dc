"""Evaluation metrics as pure functions of tensors: weighted kNN classification and top-k accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): cosine similarity, the k nearest vote with weight exp(sim / T).

    Returns class scores ``[N_test, C]`` (argmax is the prediction).
    """
    train = F.normalize(train_features.float(), dim=1)  # [N, D]
    k = min(k, len(train))
    scores = []
    for lo in range(0, len(test_features), chunk):
        test = F.normalize(test_features[lo : lo + chunk].float(), dim=1)  # [c, D]
        sim, idx = (test @ train.T).topk(k, dim=1)  # [c, k]
        weight = (sim / temperature).exp()  # [c, k]
        votes = torch.zeros(len(test), num_classes)  # [c, C]
        votes.scatter_add_(1, train_labels[idx], weight)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """Top-k accuracies in percent."""
    out = {}
    for k in ks:
        k_eff = min(k, scores.shape[1])
        hit = (scores.topk(k_eff, dim=1).indices == labels[:, None]).any(1)
        out[f"top{k}"] = 100.0 * hit.float().mean().item()
    return out
