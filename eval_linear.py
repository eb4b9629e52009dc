#!/usr/bin/env python
"""Linear probe and kNN of a frozen backbone (MoCo's linear classification protocol, or its fast cached variant).

    accelerate launch eval_linear.py runs/scan_zoo/scan --data digits --protocol cached
    accelerate launch eval_linear.py runs/scan_zoo/scan --data digits --protocol moco
    python eval_linear.py hf-hub:timm/resnet50.a1_in1k --data /path/to/imagenet --out runs/eval/r50.json

MODEL is anything scan_zoo.models.loading.load_backbone accepts: a run or export directory, a training
checkpoint directory, a .safetensors file (--arch names its architecture when no config.json is beside
it), or a timm name with weights (hf-hub:..., local-dir:..., arch.tag).

Protocols (docs/method.md): `moco` trains a linear layer on augmented crops through the frozen backbone
(SGD lr 30, momentum 0.9, wd 0, 100 epochs, lr x0.1 at 60 and 80, batch 256); `cached` trains the same
layer with the same schedule on centre-crop features extracted once and cached on disk. Both report the
last epoch's top-1/top-5 and a kNN classifier (k = 20, T = 0.07). Results go to <MODEL>/eval_results.json
for a directory (one entry per protocol, merged), else to --out (default runs/eval/<model>/eval_results.json).
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from scan_zoo.eval.probe import PROTOCOLS, ProbeConfig

    d = ProbeConfig()
    p = argparse.ArgumentParser(
        prog="eval_linear.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help="run/export directory, checkpoint directory, .safetensors file or timm name")
    p.add_argument("--data", default="digits", help="ImageFolder root with train/ and val/, or 'digits' (default)")
    p.add_argument("--data-cache", help="where 'digits' is rendered (default: ~/.cache/scan_zoo/digits)")
    p.add_argument("--arch", help="architecture of a weights file without config.json")
    p.add_argument("--protocol", choices=PROTOCOLS, default=d.protocol, help=f"(default: {d.protocol})")
    p.add_argument("--out", help="results JSON (default: beside a model directory, else runs/eval/<model>/)")
    g = p.add_argument_group("linear layer (MoCo's defaults)")
    g.add_argument("--epochs", type=str, default=d.epochs, help=f"(default: {d.epochs})")
    g.add_argument("--lr", type=str, default=d.lr, help=f"(default: {d.lr})")
    g.add_argument("--momentum", type=str, default=d.momentum, help=f"(default: {d.momentum})")
    g.add_argument("--weight-decay", type=str, default=d.weight_decay, help=f"(default: {d.weight_decay})")
    g.add_argument("--batch-size", type=str, default=d.batch_size, help=f"(default: {d.batch_size})")
    g.add_argument(
        "--milestones",
        type=str,
        nargs="*",
        default=list(d.milestones),
        help=f"epochs at which lr is multiplied by 0.1 (default: {' '.join(map(str, d.milestones))})",
    )
    g.add_argument("--seed", type=str, default=d.seed, help=f"(default: {d.seed})")
    g = p.add_argument_group("images")
    g.add_argument("--image-size", type=str, help="crop size (default: the model's input size; 32 on digits)")
    g.add_argument(
        "--eval-resize",
        type=str,
        help="resize before the centre crop (default: size / 0.875, MoCo's 256 / 224: 37 on digits)",
    )
    g.add_argument(
        "--crop-scale-min",
        type=str,
        help="RandomResizedCrop lower scale, moco protocol (default: 0.08, MoCo's; 0.5 on digits)",
    )
    g.add_argument("--crop-scale-max", type=str, default=d.crop_scale_max, help=f"(default: {d.crop_scale_max})")
    g.add_argument(
        "--hflip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random horizontal flip, moco protocol (default: on; off on digits)",
    )
    g = p.add_argument_group("kNN")
    g.add_argument("--knn-k", type=str, default=d.knn_k, help=f"(default: {d.knn_k})")
    g.add_argument("--knn-temperature", type=str, default=d.knn_temperature, help=f"(default: {d.knn_temperature})")
    g = p.add_argument_group("machinery")
    g.add_argument("--cache-dir", help="feature cache (default: ~/.cache/scan_zoo/features)")
    g.add_argument(
        "--num-workers", type=str, default=d.num_workers, help=f"DataLoader workers (default: {d.num_workers})"
    )
    g.add_argument(
        "--extract-batch-size", type=str, default=d.extract_batch_size, help=f"(default: {d.extract_batch_size})"
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace):
    """The probe's config from the options, every value type- and range-checked (one UserError line)."""
    from scan_zoo.common.validation import parse_fields
    from scan_zoo.eval.probe import ProbeConfig

    fields = (
        "protocol",
        "epochs",
        "lr",
        "momentum",
        "weight_decay",
        "batch_size",
        "seed",
        "image_size",
        "eval_resize",
        "crop_scale_min",
        "crop_scale_max",
        "hflip",
        "knn_k",
        "knn_temperature",
        "cache_dir",
        "num_workers",
        "extract_batch_size",
        "progress",
    )
    raw = {"milestones": list(args.milestones), **{f: getattr(args, f) for f in fields}}
    return ProbeConfig(**parse_fields(ProbeConfig, raw, what="the evaluation options")).validate()


def format_table(result: dict) -> str:
    """One row: protocol, data, linear top-1/top-5 (last epoch), kNN top-1/top-5, epochs, seconds."""
    r, knn = result, result["knn"]
    rows = [
        ("protocol", "data", "top-1", "top-5", f"kNN top-1 (k={knn['k']})", "kNN top-5", "epochs", "seconds"),
        (
            r["protocol"]["name"],
            str(r["dataset"]),
            f"{r['top1']:.2f}",
            f"{r['top5']:.2f}",
            f"{knn['top1']:.2f}",
            f"{knn['top5']:.2f}",
            str(r["protocol"]["epochs"]),
            f"{r['seconds']:.1f}",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import logging

    import torch
    from accelerate import PartialState

    from scan_zoo.common.errors import UserError
    from scan_zoo.eval.probe import evaluate_model, merge_results, results_path

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("scan_zoo").setLevel(logging.INFO)
    try:
        cfg = config_from_args(args)
        state = PartialState(cpu=not torch.cuda.is_available())
        result = evaluate_model(
            args.model, args.data, cfg, arch=args.arch, data_cache=args.data_cache, device=state.device
        )
        if state.is_main_process:
            path = results_path(args.model, args.out)
            merge_results(path, result)
            print(
                f"\n{args.model}: {result['train_images']} train / {result['val_images']} val images, "
                f"{result['num_classes']} classes; results in {path}"
            )
            print(format_table(result))
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # results and cache files are written whole (temp file, then rename) or not at all
        print(
            f"{parser.prog}: interrupted before the results were written; run the same command again "
            "(features already extracted are cached)",
            file=sys.stderr,
        )
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
