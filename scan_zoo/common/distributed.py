"""The few collectives contrastive training needs. With one process none of them communicates.

Processes may hold batches of different sizes (the sampler spreads an epoch's anchors evenly, so
sizes differ by at most one), so gathers pad to the largest size and strip the padding again.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every process's leading size, in rank order."""
    if world_size() == 1:
        return [n]
    t = torch.tensor([n], device=device, dtype=torch.long)
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [int(x) for x in out]


@torch.no_grad()
def gather_cat(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` [n_r, ...] from every process in rank order (no gradient): [sum n_r, ...]."""
    if world_size() == 1:
        return x
    sizes = sizes if sizes is not None else gather_sizes(len(x), x.device)
    pad = max(sizes) - len(x)
    if pad:
        x = torch.cat([x, x.new_zeros((pad,) + x.shape[1:])])
    out = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(out, x.contiguous())
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


@torch.no_grad()
def shuffle_across(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """MoCo's batch shuffle for shuffle-BN: gather the global batch and hand each process a random slice.

    Each process keeps its own batch size. Returns ``(x_shuffled [n_r, ...], idx_unshuffle [N], sizes)``;
    ``generator`` must be seeded identically on every process (the permutation is the same everywhere,
    so no broadcast is needed).
    """
    sizes = gather_sizes(len(x), x.device)
    x_all = gather_cat(x, sizes)  # [N, ...]
    perm = torch.randperm(len(x_all), generator=generator).to(x.device)  # [N]
    start = sum(sizes[: rank()])
    return x_all[perm[start:start + len(x)]], torch.argsort(perm), sizes


@torch.no_grad()
def unshuffle_across(y: torch.Tensor, idx_unshuffle: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Undo :func:`shuffle_across` on the outputs: this process's rows, in their original order."""
    y_all = gather_cat(y, sizes)  # [N, ...] in shuffled order
    start = sum(sizes[: rank()])
    return y_all[idx_unshuffle[start:start + sizes[rank()]]]
