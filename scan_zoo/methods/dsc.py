"""DSC: Dense Semantic Contrast (Li et al., ACM MM 2021), label-free pretraining for dense prediction.

Only the paper's abstract is in hand: DSC learns at three granularities at once - instance, pixel
(intra-image: "pixel neighbors from multiple views") and pixel category (inter-image: "pixel representation
from the same semantic class [is] more similar than the representation from different classes in one
mini-batch"), with categories from k-means (DSC-KM) or learned prototypes (DSC-PM). Every choice below that
the abstract leaves open is named in :class:`DSC`'s docstring and in docs/dsc.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scan_zoo.common import distributed as D
from scan_zoo.common.errors import UserError
from scan_zoo.core.dense import (
    dense_correspondence,
    dense_info_nce,
    pixel_supcon,
    sinkhorn,
    spherical_kmeans,
    swapped_prediction,
)
from scan_zoo.methods.blocks import (
    DenseProjectionHead,
    LabeledQueue,
    ProjectionHead,
    update_momentum,
)
from scan_zoo.methods.moco import MoCo
from scan_zoo.models.backbones import pooled_dim

MIN_AUTO_GRID = 4  # the automatic feature layer is the deepest map at least this many pixels on a side


def resolve_feature_layer(backbone: nn.Module, image_size: int, layer: int | None) -> int:
    """The non-negative index into ``backbone.feature_info`` of the map the dense terms use.

    ``layer`` is an index (negative counts from the end: -1 = the last map, DSC's and DenseCL's choice) or
    ``None``: the deepest map at least ``MIN_AUTO_GRID`` x ``MIN_AUTO_GRID`` at ``image_size`` (the last map
    whenever it is that large, e.g. ResNet-50 at 224 px: 7 x 7; test_resnet at 32 px: layer2, 4 x 4, its
    last map being 1 x 1). A map smaller than 2 x 2 is refused: one pixel per image makes the dense terms
    image-level terms.
    """
    info = getattr(backbone, "feature_info", None)
    name = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture") or type(backbone).__name__
    if not info or not hasattr(backbone, "forward_intermediates"):
        raise UserError(
            f"--method dsc needs a backbone with feature maps (timm feature_info and "
            f"forward_intermediates); {name} has none"
        )
    grids = [image_size // int(f["reduction"]) for f in info]  # side of each map at image_size
    if layer is None:
        fit = [i for i, g in enumerate(grids) if g >= MIN_AUTO_GRID]
        if not fit:
            raise UserError(
                f"no feature map of {name} is {MIN_AUTO_GRID}x{MIN_AUTO_GRID} or larger at image_size "
                f"{image_size} (sides {grids}): use larger images or name --dsc-feature-layer"
            )
        return fit[-1]
    if not -len(info) <= layer < len(info):
        raise UserError(
            f"dsc_feature_layer {layer} is out of range: {name} has {len(info)} feature maps "
            f"(indices 0..{len(info) - 1}, or negative from the end)"
        )
    index = layer % len(info)
    if grids[index] < 2:
        raise UserError(
            f"dsc_feature_layer {layer} of {name} is {grids[index]}x{grids[index]} at image_size "
            f"{image_size}: the dense terms need at least 2x2 (sides of the maps: {grids}); pick an "
            "earlier layer or larger images"
        )
    return index


class DenseEncoder(nn.Module):
    """Backbone + global MLP head (pooled path) + dense 1x1-conv head on one feature map, in one forward pass.

    The pooled path is the backbone's own (``forward_head`` of the final features), so ``backbone(x)`` is
    exactly what the global head sees and the exported backbone is the plain timm model.
    ``forward(x)`` returns ``(global [B, D], dense [B, Dd, H, W], feats [B, C, H, W])``: both embeddings
    L2-normalised (the dense one along channels), ``feats`` the backbone's map at ``layer``.
    """

    def __init__(self, backbone: nn.Module, layer: int, proj_dim: int = 128, dense_dim: int = 128):
        super().__init__()
        self.backbone, self.layer = backbone, layer
        self.head = ProjectionHead(pooled_dim(backbone), proj_dim)
        self.dense_head = DenseProjectionHead(int(backbone.feature_info[layer]["num_chs"]), dense_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        final, (feats,) = self.backbone.forward_intermediates(x, indices=[self.layer])  # [B, F, h, w], [B, C, H, W]
        pooled = self.backbone.forward_head(final)  # [B, F], = backbone(x)
        g = F.normalize(self.head(pooled).float(), dim=1)  # [B, D]
        d = F.normalize(self.dense_head(feats).float(), dim=1)  # [B, Dd, H, W]
        return g, d, feats


class DSC(MoCo):
    """Instance + pixel + pixel-category contrast; every key (instance, dense, the clustering input and the
    key side of the correspondence) comes from the momentum encoder ``encoder_k``.

    Loss = ``w_inst * L_inst + w_pix * L_pix + w_cat * L_cat`` (+ ``w_cat * L_proto`` for DSC-PM):

    1. ``L_inst``: MoCo-v2 exactly (:class:`~scan_zoo.methods.moco.MoCo`'s masks and queue) on the pooled
       backbone features through the global MLP head.
    2. ``L_pix``: a dense head (DenseCL's 1x1 conv - ReLU - 1x1 conv) on the backbone's map at
       ``feature_layer`` of both views. Choice: a query pixel's positive is the key-view pixel whose *backbone*
       feature is most similar (cosine; ``topk`` of them if > 1), comparing the query encoder's features of
       view 1 (detached) with the key encoder's features of view 2, as DenseCL does; the other key pixels of
       the image are ignored, the negatives are a separate queue of dense keys. Choice: that queue is fed
       one entry per image, the L2-normalised mean of its dense keys (DenseCL's), so it holds other images.
    3. ``L_cat``: the key encoder's dense embeddings of every pixel of the global batch (gathered from all
       processes; every process clusters the same points with the same seed, so no broadcast) are
       grouped into ``clusters`` categories, by ``assign="kmeans"`` (DSC-KM: cosine k-means, ``kmeans_iters``
       Lloyd iterations from a k-means++ start drawn by a generator seeded with the run seed and step) or
       ``"prototypes"`` (DSC-PM: ``clusters`` learned prototypes, SwAV's Sinkhorn balanced assignment,
       argmax of the codes). Choice: a query pixel's category is that of its corresponding key
       pixel (its positive in 2.), so every label comes from the key encoder. ``pixel_samples`` query pixels
       per process (drawn with a seeded generator) are the anchors; the keys are their corresponding key
       pixels from every process, so each anchor has at least one positive; the loss is supervised
       contrastive (:func:`~scan_zoo.core.dense.pixel_supcon`): keys of the anchor's category are positives,
       all others negatives. Choice: DSC-PM trains its prototypes with SwAV's swapped prediction (the query
       pixel's softmax over prototypes predicts its key pixel's codes), weighted like ``L_cat``.
    Choices: one temperature (``temperature``) for every softmax; the same dense embedding for the pixel
    and the category terms; clusters are formed anew every step (no memory across steps).

    Args (beyond :class:`~scan_zoo.methods.contrast.MomentumContrast`):
        feature_layer: index into ``backbone.feature_info`` (:func:`resolve_feature_layer`).
        dense_dim: dense head output channels. dense_queue_size: dense-queue length (default ``queue_size``).
        topk: positives per query pixel. assign: ``"kmeans"`` or ``"prototypes"``. clusters: categories per
        step (fewer if the batch has fewer pixels). kmeans_iters, sinkhorn_iters, sinkhorn_eps: as named.
        pixel_samples: anchors per process of ``L_cat``. weights: ``(w_inst, w_pix, w_cat)``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_layer: int,
        dense_dim: int = 128,
        dense_queue_size: int | None = None,
        topk: int = 1,
        assign: str = "kmeans",
        clusters: int = 16,
        kmeans_iters: int = 10,
        sinkhorn_iters: int = 3,
        sinkhorn_eps: float = 0.05,
        pixel_samples: int = 512,
        weights: tuple = (1.0, 1.0, 1.0),
        proj_dim: int = 128,
        **kwargs,
    ):
        assert assign in ("kmeans", "prototypes"), f"assign must be 'kmeans' or 'prototypes', not {assign!r}"
        assert clusters >= 2 and pixel_samples >= 1 and topk >= 1, "clusters >= 2, pixel_samples >= 1, topk >= 1"
        encoder = DenseEncoder(backbone, feature_layer, proj_dim, dense_dim)
        super().__init__(backbone, proj_dim=proj_dim, encoder=encoder, **kwargs)
        self.dense_queue = LabeledQueue(dense_queue_size or self.queue.size, dense_dim, seed=self.seed + 1)
        self.topk, self.assign, self.clusters = topk, assign, clusters
        self.kmeans_iters, self.sinkhorn_iters, self.sinkhorn_eps = kmeans_iters, sinkhorn_iters, sinkhorn_eps
        self.pixel_samples = pixel_samples
        self.w_inst, self.w_pix, self.w_cat = (float(w) for w in weights)
        if assign == "prototypes":
            g = torch.Generator().manual_seed(self.seed + 2)
            self.prototypes = nn.Parameter(F.normalize(torch.randn(clusters, dense_dim, generator=g), dim=1))  # [K, Dd]
        else:
            self.prototypes = None

    def _generator(self, stream: int, rank: int = 0) -> torch.Generator:
        """A CPU generator fixed by (run seed, step, stream, rank): a resumed run draws what the first one drew."""
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + int(self.steps)) * 8 + stream) * 1024 + rank)

    def forward(self, batch: dict) -> dict:
        x_q, x_k = batch["views"][0], batch["views"][1]
        q, q_dense, f_q = self.encoder_q(x_q)  # [B, D], [B, Dd, H, W], [B, C, H, W]
        with torch.no_grad():
            if self.training:
                update_momentum(self.encoder_q, self.encoder_k, self.key_momentum)
            k, k_dense, f_k = self._keys(x_k)  # the same from the momentum encoder, on view 2
        l_inst, keys, _ = self._contrast(batch, q, k)
        q_pix = q_dense.flatten(2).transpose(1, 2)  # [B, N, Dd] query pixels (N = H*W)
        k_pix = k_dense.flatten(2).transpose(1, 2)  # [B, M, Dd] key pixels
        with torch.no_grad():
            match = dense_correspondence(f_q.detach(), f_k, self.topk)  # [B, N, topk] into M
            k_mean = F.normalize(k_pix.mean(1), dim=1)  # [B, Dd] this step's dense-queue entries
            k_mean_all = D.gather_cat(k_mean, keys["sizes"])  # [Bg, Dd]
        with torch.autocast(device_type=q.device.type, enabled=False):  # float32 under bf16/fp16
            l_pix = dense_info_nce(
                q_pix.float(), k_pix.float(), match, self.dense_queue.keys.clone().detach(), self.temperature
            )
            l_cat, l_proto, used = self._category_terms(q_pix.float(), k_pix.float(), match[..., 0])
        l_cat_all = l_cat if l_proto is None else l_cat + l_proto
        loss = self.w_inst * l_inst + self.w_pix * l_pix + self.w_cat * l_cat_all
        if self.training:
            with torch.no_grad():
                self.queue.push(keys["keys"], keys["label"])
                self.dense_queue.push(k_mean_all, keys["label"])
                self.steps += 1
        out = {
            "loss": loss,
            "loss_instance": l_inst.detach(),
            "loss_pixel": l_pix.detach(),
            "loss_category": l_cat.detach(),
            "clusters": used,
        }
        if l_proto is not None:
            out["loss_prototype"] = l_proto.detach()
        return out

    def _category_terms(self, q_pix: torch.Tensor, k_pix: torch.Tensor, match: torch.Tensor):
        """``(L_cat, L_proto or None, clusters used)`` from query pixels ``[B, N, Dd]``, key pixels ``[B, M, Dd]``
        and each query pixel's corresponding key pixel ``match [B, N]``."""
        B, N, Dd = q_pix.shape
        M = k_pix.shape[1]
        with torch.no_grad():
            k_flat = k_pix.reshape(B * M, Dd)  # [B*M, Dd] this process's key pixels
            sizes = D.gather_sizes(len(k_flat), k_flat.device)
            k_all = D.gather_cat(k_flat, sizes)  # [Bg*M, Dd] every key pixel of the global batch
            start = sum(sizes[: D.rank()])
            if self.prototypes is None:  # DSC-KM
                labels_all, _ = spherical_kmeans(
                    k_all, min(self.clusters, len(k_all)), self.kmeans_iters, self._generator(1)
                )  # [Bg*M]
                codes = None
            else:  # DSC-PM
                protos = F.normalize(self.prototypes.detach().float(), dim=1)  # [K, Dd]
                codes_all = sinkhorn(k_all @ protos.T, self.sinkhorn_eps, self.sinkhorn_iters)  # [Bg*M, K]
                labels_all = codes_all.argmax(1)  # [Bg*M]
                codes = codes_all[start : start + B * M]  # [B*M, K]
            labels = labels_all[start : start + B * M]  # [B*M] categories of this process's key pixels
            used = torch.bincount(labels_all, minlength=self.clusters).gt(0).sum().float()
            S = min(self.pixel_samples, B * N)
            pick = torch.randperm(B * N, generator=self._generator(2, D.rank()))[:S].to(q_pix.device)  # [S]
            key_of = (torch.arange(B, device=match.device)[:, None] * M + match).reshape(-1)[pick]  # [S] into B*M
            y = labels[key_of]  # [S] an anchor's category = its corresponding key pixel's
            s_sizes = D.gather_sizes(S, q_pix.device)
            keys = D.gather_cat(k_flat[key_of], s_sizes)  # [Sg, Dd] the anchors' key pixels, every process
            y_keys = D.gather_cat(y, s_sizes)  # [Sg]
        anchors = q_pix.reshape(B * N, Dd)[pick]  # [S, Dd] with gradient
        l_cat = pixel_supcon(anchors, keys, y, y_keys, self.temperature)
        if codes is None:
            return l_cat, None, used
        scores = anchors @ F.normalize(self.prototypes.float(), dim=1).T / self.temperature  # [S, K]
        return l_cat, swapped_prediction(scores, codes[key_of]), used
