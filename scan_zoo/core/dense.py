"""The dense (pixel-level) parts of DSC as pure functions of tensors: no state, no I/O, no distributed calls.

- :func:`dense_correspondence`: each query-view pixel's most similar key-view pixels (cosine, argmax / top-k);
- :func:`dense_info_nce`: pixel InfoNCE, positives = the corresponding key pixels, negatives = a queue;
- :func:`spherical_kmeans`: k-means on the unit sphere, k-means++ start, fixed iterations (DSC-KM);
- :func:`sinkhorn`: the balanced (equipartition) assignment of SwAV (DSC-PM);
- :func:`pixel_supcon`: supervised contrastive loss over pixels, labels = cluster ids;
- :func:`swapped_prediction`: cross-entropy of the query's prototype scores against the key's balanced codes.

Every loss goes through :func:`scan_zoo.core.losses.masked_info_nce` where it is an InfoNCE, and every function
computes in float32 whatever the inputs' dtype. ``tests/test_dsc.py`` checks each against a naive loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scan_zoo.core.losses import masked_info_nce


def dense_correspondence(f_q: torch.Tensor, f_k: torch.Tensor, topk: int = 1) -> torch.Tensor:
    """For each pixel of ``f_q``, the ``topk`` pixels of ``f_k`` (same image) with the highest cosine similarity.

    Args:
        f_q: ``[B, C, H, W]`` dense features of view 1. f_k: ``[B, C, H', W']`` dense features of view 2.
        topk: how many key pixels per query pixel (1 = DenseCL's argmax).
    Returns:
        ``[B, H*W, topk]`` int64 indices into the flattened (row-major) ``H' * W'`` key pixels, most similar
        first. Ties go to the lower index (``torch.topk`` on CPU; not guaranteed on every device).
    """
    if f_q.shape[:2] != f_k.shape[:2]:
        raise ValueError(f"f_q {tuple(f_q.shape)} and f_k {tuple(f_k.shape)} differ in batch or channels")
    m = f_k.shape[2] * f_k.shape[3]
    if not 1 <= topk <= m:
        raise ValueError(f"topk must lie in [1, {m}] (key pixels per image), not {topk}")
    q = F.normalize(f_q.float().flatten(2), dim=1)  # [B, C, N]
    k = F.normalize(f_k.float().flatten(2), dim=1)  # [B, C, M]
    sim = torch.bmm(q.transpose(1, 2), k)  # [B, N, M] cosine
    return sim.topk(topk, dim=2).indices  # [B, N, topk]


def dense_info_nce(
    q: torch.Tensor, k: torch.Tensor, match: torch.Tensor, queue: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Pixel InfoNCE: each query pixel against its matched key pixels (positives) and a queue (negatives).

    For query pixel ``n`` of image ``b`` with positive set ``P = match[b, n]``:
    ``L = -1/|P| sum_{p in P} log( exp(q.k_p / t) / (sum_{p' in P} exp(q.k_p' / t) + sum_l exp(q.z_l / t)) )``.
    The other key pixels of the same image are neither positives nor negatives (as in DenseCL, whose loss
    this is when ``topk = 1``). Averaged over every query pixel.

    Args:
        q: ``[B, N, D]`` query pixel embeddings, L2-normalised. k: ``[B, M, D]`` key pixel embeddings,
            L2-normalised. match: ``[B, N, t]`` int64 indices into ``M`` (:func:`dense_correspondence`).
        queue: ``[L, D]`` negatives, L2-normalised. temperature: ``t``.
    """
    B, N, D = q.shape
    M = k.shape[1]
    q, k, queue = q.float(), k.float(), queue.float()
    l_own = torch.bmm(q, k.transpose(1, 2)).reshape(B * N, M)  # [B*N, M] own image's key pixels
    l_queue = q.reshape(B * N, D) @ queue.T  # [B*N, L]
    logits = torch.cat([l_own, l_queue], 1) / temperature  # [B*N, M + L]
    pos = torch.zeros(B * N, M + len(queue), dtype=torch.bool, device=q.device)  # [B*N, M + L]
    pos[:, :M].scatter_(1, match.reshape(B * N, -1), True)
    neg = torch.zeros_like(pos)
    neg[:, M:] = True
    return masked_info_nce(logits, pos, neg)


def kmeans_pp_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on the unit sphere: ``k`` distinct row indices of ``x [N, D]`` (L2-normalised).

    The first row is drawn uniformly, each next one with probability proportional to its squared distance
    ``2 - 2 cos`` to the nearest row drawn so far (uniformly among the rest if every distance is 0). Draws use
    ``generator`` on the CPU, so the same generator state gives the same rows on every device and process.
    Returns ``[k]`` int64 (on the CPU).
    """
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = (x @ x[chosen[0]]).cpu().double()  # [N] highest cosine to a chosen row
    for _ in range(1, k):
        w = (2.0 - 2.0 * nearest).clamp(min=0.0)  # [N] squared distance to the nearest chosen row
        w[chosen] = 0.0
        if w.sum() <= 0:
            w = torch.ones(n, dtype=torch.float64)
            w[chosen] = 0.0
        chosen.append(int(torch.multinomial(w, 1, generator=generator)))
        nearest = torch.maximum(nearest, (x @ x[chosen[-1]]).cpu().double())
    return torch.tensor(chosen)


def spherical_kmeans(
    x: torch.Tensor, k: int, iters: int, generator: torch.Generator, init: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine k-means with a fixed number of Lloyd iterations.

    Start: the rows ``init`` of ``x``, by default :func:`kmeans_pp_init` with ``generator`` (k-means++:
    plain random rows often put two centroids in one group and none in another). Each iteration assigns
    every point to the centroid of highest cosine (ties: the lower centroid index), then moves each centroid
    to the normalised sum of its points; a centroid left without points keeps its place. The returned
    assignment is made with the final centroids. No convergence test: cost and result are fixed by ``iters``.

    Args:
        x: ``[N, D]`` points (normalised here). k: clusters, ``1 <= k <= N``. iters: Lloyd iterations ``>= 0``.
        init: ``[k]`` row indices to start from, instead of k-means++.
    Returns:
        ``(assign [N] int64, centroids [k, D] float32)``.
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}] (the number of points), not {k}")
    x = F.normalize(x.float(), dim=1)  # [N, D]
    init = kmeans_pp_init(x, k, generator) if init is None else init  # [k]
    centroids = x[init.to(x.device)].clone()  # [k, D]
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(1)  # [N]
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # [k, D]
        counts = torch.bincount(assign, minlength=k)  # [k]
        centroids = torch.where((counts > 0)[:, None], F.normalize(sums, dim=1), centroids)
    return (x @ centroids.T).argmax(1), centroids


def sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp: soft codes whose columns (prototypes) share the points equally.

    ``Q = exp(scores / eps)``, then ``iters`` rounds of: scale every prototype's column to total ``N / K``,
    scale every point's row to total 1. Computed in float64 (stable for small ``eps``); the global maximum
    is subtracted before ``exp``, which the normalisation cancels.

    Args:
        scores: ``[N, K]`` similarities of points to prototypes. eps: entropy regularisation. iters: ``>= 1``.
    Returns:
        ``[N, K]`` float32 codes, each row summing to 1.
    """
    s = scores.double()
    q = torch.exp((s - s.max()) / eps)  # [N, K]
    q = q / q.sum()
    n, k = q.shape
    for _ in range(iters):
        q = q / q.sum(0, keepdim=True) / k  # every prototype gets 1/K of the mass
        q = q / q.sum(1, keepdim=True) / n  # every point gets 1/N of the mass
    return (q * n).float()


def pixel_supcon(
    anchors: torch.Tensor, keys: torch.Tensor, anchor_labels: torch.Tensor, key_labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., L_out) of pixels: positives share a label (a cluster id).

    ``L_i = -1/|P(i)| sum_{p in P(i)} log( exp(a_i.k_p / t) / sum_j exp(a_i.k_j / t) )`` over all keys ``j``,
    ``P(i) = {j : key_labels[j] == anchor_labels[i]}``; anchors without a positive get zero weight.

    Args: anchors ``[S, D]``, keys ``[T, D]`` (L2-normalised), anchor_labels ``[S]``, key_labels ``[T]``.
    """
    logits = anchors.float() @ keys.float().T / temperature  # [S, T]
    pos = anchor_labels[:, None] == key_labels[None, :]  # [S, T]
    return masked_info_nce(logits, pos, ~pos)


def swapped_prediction(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``-mean_i sum_k codes[i, k] log softmax(logits[i])_k``: query scores predict the key's codes (SwAV).

    Args: logits ``[S, K]`` (prototype scores already divided by the temperature), codes ``[S, K]`` (rows sum to 1).
    """
    return -(codes.float() * F.log_softmax(logits.float(), dim=1)).sum(1).mean()
