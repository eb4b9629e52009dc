"""The few collectives contrastive training needs. With one process none of them communicates.

Processes may hold batches of different sizes (the sampler spreads an epoch's anchors evenly, so
sizes differ by at most one), so gathers pad to the largest size and strip the padding again.

A process of a multi-process (or multi-node) run that dies, or stops answering for longer than the process
group's timeout (``--dist-timeout``), makes the next collective of every other process fail; :func:`peer_lost`
recognises that error, which ``train.py`` reports in one line with exit status :data:`PEER_LOST_EXIT`.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

#: exit status of a run that stopped because another process of it was lost (killed, its node gone) or timed out
PEER_LOST_EXIT = 4

# A plain RuntimeError counts only when it comes from the communication layer (gloo names its source file, torch's
# process groups and store name themselves) and says that the other end is gone or silent.
_COMMS = re.compile(r"gloo|c10d|nccl|ProcessGroup|TCPStore", re.IGNORECASE)
_PEER_LOST = re.compile(
    r"connection (closed|reset) by peer|timed out|timeout|broken pipe|connection refused|"
    r"failed to recv|remote worker crash",
    re.IGNORECASE,
)


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
    return x_all[perm[start : start + len(x)]], torch.argsort(perm), sizes


@torch.no_grad()
def unshuffle_across(y: torch.Tensor, idx_unshuffle: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Undo :func:`shuffle_across` on the outputs: this process's rows, in their original order."""
    y_all = gather_cat(y, sizes)  # [N, ...] in shuffled order
    start = sum(sizes[: rank()])
    return y_all[idx_unshuffle[start : start + sizes[rank()]]]


def peer_lost(error: BaseException) -> str | None:
    """What ``error`` says in one line, when it is a collective or store operation failing because another
    process of the run was lost or timed out; None for any other error."""
    if not isinstance(error, RuntimeError):
        return None
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if not (
        isinstance(error, dist.DistError) or (world_size() > 1 and _COMMS.search(text) and _PEER_LOST.search(text))
    ):
        return None
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|hpp|h):\d+\]\s*", "", text)  # the C++ source location of the message
    text = text.split(" This is typically caused", 1)[0]  # gloo's advice after the reason
    return text.strip()[:300] or type(error).__name__
