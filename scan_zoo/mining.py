"""SCAN stage 1 end to end: appearance features of the training set from a label-free model, then the
per-class neighbour table (:mod:`scan_zoo.neighbors`), saved with its provenance."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import data as data_lib
from .errors import UserError
from .evaluation import extract_features
from .models import load_backbone
from .neighbors import dataset_provenance, load_neighbors, mine_neighbors, save_neighbors

logger = logging.getLogger(__name__)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def mine_dataset(appearance_model: str, data_root: Path, out: Path, k: int, image_size: int,
                 eval_resize: int | None = None, arch: str | None = None, accelerator=None,
                 batch_size: int = 256, num_workers: int = 2, base=None) -> torch.Tensor:
    """Extract features of ``data_root/train`` with ``appearance_model`` and mine its top-K table into ``out``.

    With several processes each extracts a shard; the main process mines and writes; all return the table.
    ``base`` is the train split's ImageFolder when the caller has it already (listing ImageNet takes a while).
    """
    main = accelerator is None or accelerator.is_main_process
    base = base if base is not None else data_lib.image_folder(data_root, "train")
    backbone, desc = load_backbone(appearance_model, arch=arch)
    prov = dataset_provenance(base, k, desc)
    if Path(desc).is_file():  # identify the weights by content, not only by path
        prov["appearance_sha256"] = file_sha256(Path(desc))
    if Path(out).is_file():  # mined before (a resumed run): reuse it if it was mined the same way
        try:
            return load_neighbors(out, prov)[0]
        except UserError:
            pass
    device = accelerator.device if accelerator is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    images = data_lib.EvalImages(base, data_lib.eval_transform(image_size, eval_resize))
    feats, labels = extract_features(backbone.to(device), images, batch_size, num_workers, device,
                                     desc="appearance features", progress=main)
    if main:
        indices, sims = mine_neighbors(feats, labels, k, progress=True)
        save_neighbors(out, indices, sims, prov)
        logger.info("mined %d neighbours for %d images into %s", k, len(indices), out)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    expect = {key: prov[key] for key in ("num_images", "num_classes", "fingerprint", "k")}
    return load_neighbors(out, expect)[0]


def neighbors_for(cfg, data_root: Path, run_dir: Path, accelerator=None) -> torch.Tensor:
    """The neighbour table a SCAN run needs: the file named by ``cfg.neighbors``, checked against the data,
    or mined now from ``cfg.appearance_model`` into ``run_dir/neighbors.safetensors``."""
    base = data_lib.image_folder(data_root, "train")
    if cfg.neighbors:
        prov = dataset_provenance(base, cfg.k, "")
        expect = {key: prov[key] for key in ("num_images", "num_classes", "fingerprint", "k")}
        return load_neighbors(cfg.neighbors, expect)[0]
    if cfg.appearance_model:
        return mine_dataset(cfg.appearance_model, data_root, Path(run_dir) / "neighbors.safetensors", cfg.k,
                            cfg.image_size, cfg.eval_resize, arch=cfg.model, accelerator=accelerator, base=base)
    raise UserError("--method scan needs positive neighbours: pass --neighbors FILE (from `scan-zoo mine`) or "
                    "--appearance-model MODEL (a label-free model, e.g. a MoCo run directory, to mine them with); "
                    "or run the whole pipeline with --method pipeline")
