"""Nearest-neighbour retrieval figures: the SCAN paper's Fig. 1 and Fig. 4.

Queries are validation images; the gallery is the train split. Each model retrieves by cosine
similarity of its pooled features (L2-normalised), computed under the evaluation transform that
``eval_linear.py`` and its kNN use (:func:`scan_zoo.eval.probe.resolve_config`: the model's mean/std and input
size; Resize(37) + CenterCrop(32) on the digit scenes), so the figure's precision@k and the kNN numbers come from
the same features.

The figure (:mod:`scan_zoo.eval.retrieval_figure`) has one row per query: the query first, then each model's
top-k neighbours framed green (the query's class) or red (another class). Beside the PNG a JSON records every
query and neighbour (index, path, label, similarity, pixel box) and each model's precision@k over the
queries drawn and over the whole validation split.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from scan_zoo.common.errors import UserError
from scan_zoo.data import datasets as data_lib
from scan_zoo.data.datasets import EvalImages
from scan_zoo.data.imageio import display_path
from scan_zoo.eval import probe
from scan_zoo.eval.probe import load_splits
from scan_zoo.eval.retrieval_figure import Layout, open_image, retrieval_grid
from scan_zoo.models.features import extract_features
from scan_zoo.models.loading import load_backbone

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- retrieval
@torch.no_grad()
def retrieve(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    k: int,
    exclude_self: torch.Tensor | None = None,
    chunk: int = 8192,
    query_chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` gallery items of each query by cosine similarity: ``(sims float32 [Q, k], idx int64 [Q, k])``.

    Features are L2-normalised here; rows are sorted by decreasing similarity. ``exclude_self`` (int64 [Q])
    gives each query's own index in the gallery, never returned (``-1``: nothing to exclude), for
    leave-one-out retrieval within one split. The ``Q x N`` similarity matrix is never built whole:
    queries go ``query_chunk`` at a time against ``chunk`` gallery items at a time, keeping a running top-k.
    """
    q_all = F.normalize(query_feats.float(), dim=1)  # [Q, D]
    gallery = F.normalize(gallery_feats.float(), dim=1)  # [N, D]
    n = len(gallery)
    if q_all.shape[1] != gallery.shape[1]:
        raise ValueError(f"query features have dimension {q_all.shape[1]}, gallery features {gallery.shape[1]}")
    available = n - (1 if exclude_self is not None else 0)
    if not 1 <= k <= available:
        raise ValueError(
            f"k = {k} neighbours asked of a gallery of {n} items"
            + (" (one excluded per query)" if exclude_self is not None else "")
        )
    if exclude_self is not None:
        exclude_self = torch.as_tensor(exclude_self, dtype=torch.long)
        assert exclude_self.shape == (len(q_all),), "exclude_self holds one gallery index per query"
    out_sims, out_idx = [], []
    for qlo in range(0, len(q_all), query_chunk):
        q = q_all[qlo : qlo + query_chunk]  # [q, D]
        best_sims = torch.full((len(q), 0), float("-inf"))  # [q, <=k] running top-k
        best_idx = torch.zeros((len(q), 0), dtype=torch.long)
        for lo in range(0, n, chunk):
            sims = q @ gallery[lo : lo + chunk].T  # [q, c]
            if exclude_self is not None:
                own = exclude_self[qlo : qlo + query_chunk] - lo  # [q] position of self in this chunk
                rows = ((own >= 0) & (own < sims.shape[1])).nonzero().flatten()
                sims[rows, own[rows]] = float("-inf")
            s, i = sims.topk(min(k, sims.shape[1]), dim=1)  # [q, k']
            merged_s = torch.cat([best_sims, s], 1)  # [q, k + k']
            merged_i = torch.cat([best_idx, i + lo], 1)
            best_sims, top = merged_s.topk(min(k, merged_s.shape[1]), dim=1)  # [q, k]
            best_idx = merged_i.gather(1, top)
        out_sims.append(best_sims)
        out_idx.append(best_idx)
    return torch.cat(out_sims), torch.cat(out_idx)


def precision_at_k(query_labels: torch.Tensor, neighbor_labels: torch.Tensor) -> float:
    """Fraction of the neighbours (``[Q, k]`` labels) that have their query's class (``[Q]``)."""
    if neighbor_labels.numel() == 0:
        return float("nan")
    return (neighbor_labels == query_labels[:, None]).double().mean().item()


def choose_queries(labels: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """``n`` image indices spread over the classes, deterministic given ``seed``; sorted by class.

    Classes are visited round-robin in a seeded order, each giving one image (drawn at random without
    replacement) per visit, so per-class counts differ by at most one unless a class runs out of images.
    With fewer queries than classes, a seeded subset of the classes is shown.
    """
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    if not 1 <= n <= len(labels):
        raise ValueError(f"cannot choose {n} queries from {len(labels)} images")
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    pools = {}
    for c in classes.tolist():
        members = (labels == c).nonzero().flatten()  # [n_c]
        pools[c] = members[torch.randperm(len(members), generator=g)].tolist()
    order = classes[torch.randperm(len(classes), generator=g)].tolist()
    picked: dict[int, list[int]] = {c: [] for c in order}
    total = 0
    while total < n:
        for c in order:
            if total < n and pools[c]:
                picked[c].append(pools[c].pop())
                total += 1
    return [i for c in sorted(picked) for i in picked[c]]


# ------------------------------------------------------------------------------------------------ driver
def display_name(ref: str) -> str:
    """A short column header for a model reference: a run/export folder's name, or the timm name."""
    path = Path(ref)
    if path.exists():
        if path.is_file():
            path = path.parent if path.name == "model.safetensors" else path.with_suffix("")
        return path.resolve().name or str(ref)
    return ref


def default_out(names: Sequence[str]) -> Path:
    """``runs/retrieval/<models>/retrieval.png``: one folder per set of models, named by their headers joined
    with '+' (characters other than letters, digits, '.', '_', '-' become '_'; a long name is cut and hashed)."""
    joined = "+".join(names)
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-+") else "_" for c in joined).strip(".") or "model"
    if len(safe) > 100:
        safe = f"{safe[:80]}-{hashlib.sha256(joined.encode()).hexdigest()[:12]}"
    return Path("runs") / "retrieval" / safe / "retrieval.png"


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n} ({seen[n]})")
    return out


def model_features(
    ref: str,
    train,
    val,
    data: str,
    batch_size: int = 256,
    num_workers: int = 2,
    device: str = "cpu",
    progress: bool = True,
    name: str | None = None,
) -> dict:
    """Load ``ref`` and extract its pooled features of ``train`` and ``val`` under its evaluation transform.

    Returns ``{"train": [N, D], "val": [M, D], "weights", "preprocessing"}``.
    """
    backbone, description = load_backbone(ref)
    weights = Path(description) if Path(description).is_file() else None
    cfg = probe.resolve_config(
        probe.ProbeConfig(num_workers=num_workers, progress=progress),
        probe.model_preprocessing(backbone, weights),
        data,
    )
    transform = probe.eval_transform(cfg)
    backbone = backbone.to(device)
    name = name or display_name(ref)
    train_feats, _ = extract_features(
        backbone,
        EvalImages(train, transform),
        batch_size,
        num_workers,
        device,
        desc=f"{name}: train",
        progress=progress,
    )  # [N, D]
    val_feats, _ = extract_features(
        backbone, EvalImages(val, transform), batch_size, num_workers, device, desc=f"{name}: val", progress=progress
    )  # [M, D]
    return {
        "train": train_feats,
        "val": val_feats,
        "weights": description,
        "preprocessing": {
            "image_size": cfg.image_size,
            "eval_resize": cfg.eval_resize,
            "mean": list(cfg.mean),
            "std": list(cfg.std),
        },
    }


def run_retrieval(
    models: list[str],
    data: str = "digits",
    queries: int = 8,
    k: int = 3,
    out: Path | None = None,
    seed: int = 0,
    data_cache: str | None = None,
    num_workers: int = 2,
    *,
    names: list[str] | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Retrieve the train-split neighbours of ``queries`` val images with each model; write the PNG and JSON.

    ``models``: anything :func:`scan_zoo.models.loading.load_backbone` accepts, drawn in this order; ``names``
    their column headers (default: folder or timm names). ``out`` defaults to :func:`default_out` (under
    ``runs/``, never the current directory itself). The JSON (``out`` with suffix ``.json``) is
    returned: query indices, per model the neighbours' indices, paths, labels, similarities and pixel
    boxes, and precision@k over the queries shown and over every val image.
    """
    if not models:
        raise UserError("name at least one model to retrieve with")
    if k < 1 or queries < 1:
        raise UserError(f"queries and k must be at least 1 (got queries={queries}, k={k})")
    names = _unique(list(names) if names else [display_name(m) for m in models])
    if len(names) != len(models):
        raise UserError(f"{len(names)} names given for {len(models)} models")
    out = Path(out) if out is not None else default_out(names)
    root = data_lib.resolve_data_root(data, data_cache, progress=progress)
    train, val = load_splits(root)
    if k > len(train):
        raise UserError(f"k = {k} neighbours asked of a train split of {len(train)} images")
    if queries > len(val):
        raise UserError(f"{queries} queries asked of a val split of {len(val)} images")
    train_labels = torch.as_tensor(train.targets, dtype=torch.long)  # [N]
    val_labels = torch.as_tensor(val.targets, dtype=torch.long)  # [M]
    chosen = choose_queries(val.targets, queries, seed)
    chosen_t = torch.as_tensor(chosen, dtype=torch.long)  # [Q]

    per_model = []
    for ref, name in zip(models, names):
        feats = model_features(ref, train, val, data, batch_size, num_workers, device, progress, name)
        sims, idx = retrieve(feats["val"], feats["train"], k)  # [M, k] every val image
        p_all = precision_at_k(val_labels, train_labels[idx])
        sims, idx = sims[chosen_t], idx[chosen_t]  # [Q, k] the queries drawn
        p_shown = precision_at_k(val_labels[chosen_t], train_labels[idx])
        logger.info(
            "%s: precision@%d %.3f on all %d val images, %.3f on the %d shown",
            name,
            k,
            p_all,
            len(val),
            p_shown,
            len(chosen),
        )
        per_model.append(
            {
                "name": name,
                "model": ref,
                "weights": feats["weights"],
                "preprocessing": feats["preprocessing"],
                "precision_at_k": {"shown": p_shown, "all_val": p_all, "val_images": len(val)},
                "sims": sims,
                "idx": idx,
            }
        )

    layout = Layout(len(chosen), len(models), k)
    classes = [display_path(c) for c in train.classes]  # names escaped for the JSON and the captions
    query_entries = [
        {
            "index": i,
            "path": display_path(val.samples[i][0]),
            "label": int(val_labels[i]),
            "class": classes[int(val_labels[i])],
            "box": list(layout.box(row)),
        }
        for row, i in enumerate(chosen)
    ]
    model_entries = []
    for m, pm in enumerate(per_model):
        rows = []
        for row, q in enumerate(chosen):
            rows.append(
                [
                    {
                        "index": int(j),
                        "path": display_path(train.samples[int(j)][0]),
                        "label": int(train_labels[j]),
                        "class": classes[int(train_labels[j])],
                        "similarity": float(s),
                        "same_class": bool(train_labels[j] == val_labels[q]),
                        "box": list(layout.box(row, m, r)),
                    }
                    for r, (s, j) in enumerate(zip(pm["sims"][row], pm["idx"][row]))
                ]
            )
        model_entries.append(
            {key: pm[key] for key in ("name", "model", "weights", "preprocessing", "precision_at_k")}
            | {"neighbors": rows}
        )

    grid = retrieval_grid(
        query_images=[open_image(val, val.samples[e["index"]][0]) for e in query_entries],
        query_captions=[f"class {e['class']}" for e in query_entries],
        query_labels=[e["label"] for e in query_entries],
        model_names=names,
        neighbor_images=[
            [[open_image(train, train.samples[n["index"]][0]) for n in row] for row in me["neighbors"]]
            for me in model_entries
        ],
        neighbor_labels=[[[n["label"] for n in row] for row in me["neighbors"]] for me in model_entries],
        neighbor_captions=[
            [[f"{n['class']}  {n['similarity']:.3f}" for n in row] for row in me["neighbors"]] for me in model_entries
        ],
        precision_shown=[me["precision_at_k"]["shown"] for me in model_entries],
        precision_all=[me["precision_at_k"]["all_val"] for me in model_entries],
        total_queries=len(val),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    result = {
        "image": str(out),
        "image_size": list(grid.size),
        "data": data,
        "data_root": str(root),
        "query_split": "val",
        "gallery_split": "train",
        "k": k,
        "seed": seed,
        "classes": list(classes),
        "queries": query_entries,
        "models": model_entries,
        "similarity": "cosine of L2-normalised pooled features, eval transform of eval_linear.py",
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    """Register ``scan-zoo retrieve`` on the CLI's sub-parsers."""
    p = subparsers.add_parser(
        "retrieve",
        help="figure of val queries and each model's top-k train neighbours (the SCAN paper's Fig. 1 / Fig. 4)",
    )
    p.add_argument(
        "--models",
        nargs="+",
        required=True,
        help="models, one column group each, in this order: "
        "run/export directories, .safetensors files, or timm names with weights (arch.tag)",
    )
    p.add_argument("--names", nargs="+", default=None, help="column headers (default: folder or timm names)")
    p.add_argument("--queries", type=int, default=8, help="val images to query, spread over the classes (default 8)")
    p.add_argument("--k", type=int, default=3, help="neighbours shown per model (default 3)")
    p.add_argument("--data", default="digits", help="ImageFolder root with train/ and val/, or 'digits'")
    p.add_argument("--data-cache", default=None, help="where 'digits' is rendered")
    p.add_argument(
        "--out",
        default=None,
        help="PNG to write; the JSON goes beside it (default runs/retrieval/<model names>/retrieval.png)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the query choice (default 0)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_retrieve)


def _cmd_retrieve(args) -> int:
    result = run_retrieval(
        args.models,
        data=args.data,
        queries=args.queries,
        k=args.k,
        out=Path(args.out) if args.out else None,
        seed=args.seed,
        data_cache=args.data_cache,
        num_workers=args.num_workers,
        names=args.names,
        batch_size=args.batch_size,
        device=args.device,
    )
    for m in result["models"]:
        p = m["precision_at_k"]
        print(
            f"{m['name']}: precision@{result['k']} {p['all_val']:.3f} on all {p['val_images']} val images, "
            f"{p['shown']:.3f} on the {len(result['queries'])} shown"
        )
    print(f"retrieval figure written to {result['image']} (details in {Path(result['image']).with_suffix('.json')})")
    return 0
