#!/usr/bin/env python
"""Why the linear protocols validate on a centre crop of an enlarged image: the train-test size gap.

    python benchmarks/probe_val_zoom.py scan_zoo/weights/test_resnet.moco_digits

Trains the linear layer of both protocols (scan_zoo.eval.probe, 100 epochs, MoCo's settings) on one
backbone, then scores each final classifier on the val split seen several ways: Resize(R) +
CenterCrop(crop) for each R in --resizes (R = crop shows the whole image; larger R enlarges it, as
the moco protocol's RandomResizedCrop does in training), and through the moco protocol's own training
crops (mean over --crop-draws draws). A classifier whose accuracy rises with R was fitted on objects
larger than the whole image shows them (FixRes, Touvron et al. 2019).

Prints one row per protocol and one column per view; --out writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from scan_zoo.data import datasets as data_lib
    from scan_zoo.eval import probe
    from scan_zoo.models import features as evaluation
    from scan_zoo.models.loading import load_backbone

    p = argparse.ArgumentParser(
        prog="probe_val_zoom.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help="run/export directory, checkpoint directory, .safetensors file or zoo name")
    p.add_argument("--data", default="digits", help="ImageFolder root with train/ and val/, or 'digits' (default)")
    p.add_argument(
        "--train-resize", type=int, help="the protocols' own validation resize (default: theirs, crop / 0.875)"
    )
    p.add_argument(
        "--resizes",
        type=int,
        nargs="+",
        default=[32, 34, 35, 36, 37, 38],
        help="validation resizes to score (default: 32 34 35 36 37 38)",
    )
    p.add_argument("--crop-draws", type=int, default=3, help="draws of the training crops of val (default: 3)")
    p.add_argument("--epochs", type=int, default=100, help="linear-layer epochs of both protocols (default: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--out", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)

    root = data_lib.resolve_data_root(args.data, None, progress=False)
    train, val = probe.load_splits(root)
    backbone, description = load_backbone(args.model)
    weights = Path(description) if Path(description).is_file() else None
    backbone.eval().requires_grad_(False)
    rows = {}
    for protocol in probe.PROTOCOLS:
        cfg = probe.resolve_config(
            probe.ProbeConfig(
                protocol=protocol,
                epochs=args.epochs,
                seed=args.seed,
                num_workers=args.num_workers,
                eval_resize=args.train_resize,
                progress=False,
            ),
            probe.model_preprocessing(backbone, weights),
            args.data,
        )
        feats = probe.centre_crop_features(backbone, train, val, cfg)
        classifier, history = probe.fit_linear(
            probe.training_batches(backbone, train, feats, cfg),
            feats["train_features"].shape[1],
            len(train.classes),
            feats["val_features"],
            feats["val_labels"],
            cfg,
        )
        row = {"validated_at": cfg.eval_resize, "reported_top1": history[-1]["top1"]}
        for resize in args.resizes:
            tf = data_lib.eval_transform(cfg.image_size, resize, cfg.mean, cfg.std)
            f, y = evaluation.extract_features(
                backbone, data_lib.EvalImages(val, tf), 256, args.num_workers, "cpu", progress=False
            )  # [M, D], [M]
            row[f"resize {resize}"] = probe.classifier_accuracy(classifier, f, y)["top1"]
        crops = data_lib.EvalImages(val, probe.train_transform(dataclasses.replace(cfg, protocol="moco")))
        scores = []
        for draw in range(args.crop_draws):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1000 + draw)  # no workers: the crops are drawn from this generator
                f, y = evaluation.extract_features(backbone, crops, 256, 0, "cpu", progress=False)
            scores.append(probe.classifier_accuracy(classifier, f, y)["top1"])
        row["training crops"] = sum(scores) / len(scores)
        rows[protocol] = row
    views = [f"resize {r}" for r in args.resizes] + ["training crops"]
    print(f"\n{args.model} on {args.data}: top-1 (%) of each protocol's final classifier, val split seen as")
    print(f"{'protocol':<9}{'reported':>9}" + "".join(f"{v:>16}" for v in views))
    for protocol, row in rows.items():
        print(f"{protocol:<9}{row['reported_top1']:>9.2f}" + "".join(f"{row[v]:>16.2f}" for v in views))
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"model": args.model, "data": args.data, "seed": args.seed, "epochs": args.epochs, "protocols": rows},
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
