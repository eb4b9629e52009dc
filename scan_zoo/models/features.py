"""One feature-extraction loop: the pooled features of every image of a data set, sharded across processes."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from scan_zoo.common import distributed as dist_lib
from scan_zoo.models.backbones import pooled_dim


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    num_workers: int = 2,
    device: torch.device | str | None = None,
    desc: str = "features",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of every image, in dataset order: ``(features float32 [N, D], labels int64 [N])``.

    ``dataset`` yields ``(image, label, index)``. When a process group is initialised each process
    extracts a contiguous shard and every process receives the whole result (one process: no collective).
    """
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
