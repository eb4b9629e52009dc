"""Feature extraction and kNN evaluation (pure functions where possible)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .models import pooled_dim


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: Dataset, batch_size: int = 256, num_workers: int = 2,
                     device: torch.device | str | None = None, desc: str = "features",
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of every image, in dataset order: ``(features float32 [N, D], labels int64 [N])``.

    ``dataset`` yields ``(image, label, index)``. When a process group is initialised each process
    extracts a contiguous shard and every process receives the whole result (one process: no collective).
    """
    from tqdm.auto import tqdm

    from . import distributed as dist_lib

    was_training = backbone.training
    backbone.eval()
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    world, rank = dist_lib.world_size(), dist_lib.rank()
    n = len(dataset)
    shard = Subset(dataset, range(rank * n // world, (rank + 1) * n // world))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for x, y, _ in tqdm(loader, desc=desc, disable=not progress or rank != 0, unit="batch", leave=False):
        feats.append(backbone(x.to(device)).float())  # [b, D]
        labels.append(y.to(device))
    backbone.train(was_training)
    dim = pooled_dim(backbone)
    feats = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)  # [n_r, D]
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    sizes = dist_lib.gather_sizes(len(feats), device)
    return dist_lib.gather_cat(feats, sizes).cpu(), dist_lib.gather_cat(labels, sizes).cpu()


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): cosine similarity, the k nearest vote with weight exp(sim / T).

    Returns class scores ``[N_test, C]`` (argmax is the prediction).
    """
    train = F.normalize(train_features.float(), dim=1)  # [N, D]
    k = min(k, len(train))
    scores = []
    for lo in range(0, len(test_features), chunk):
        test = F.normalize(test_features[lo:lo + chunk].float(), dim=1)  # [c, D]
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
