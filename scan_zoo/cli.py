"""The ``scan-zoo`` command: data, stage-1 mining (more sub-commands join as the zoo grows)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_data(args) -> int:
    from .digits import render_digits

    out = render_digits(args.out, renders=args.renders, size=args.size, seed=args.seed)
    print(f"digit scenes written to {out} (train/ and val/ ImageFolder trees, metadata.npz)")
    return 0


def _cmd_mine(args) -> int:
    from . import data as data_lib
    from .mining import mine_dataset

    root = data_lib.resolve_data_root(args.data, args.data_cache)
    out = Path(args.out)
    mine_dataset(args.model, root, out, args.k, args.image_size, args.eval_resize, arch=args.arch,
                 batch_size=args.batch_size, num_workers=args.num_workers)
    print(f"neighbour table (K={args.k}) written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scan-zoo", description="SCAN (Supervised Contrastive Adjustment in "
                                "Neighborhood, Wei et al.) model zoo tools. Not SCAN clustering (Van Gansbeke et al.).")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="write a data set to disk")
    dsub = d.add_subparsers(dest="dataset", required=True)
    dg = dsub.add_parser("digits", help="render the digit scenes (ImageFolder tree + metadata.npz)")
    dg.add_argument("--out", required=True, help="output directory")
    dg.add_argument("--renders", type=int, default=4, help="renders per glyph (default 4)")
    dg.add_argument("--size", type=int, default=32, help="canvas size in pixels (default 32)")
    dg.add_argument("--seed", type=int, default=0, help="rendering seed (default 0)")
    dg.set_defaults(func=_cmd_data)

    m = sub.add_parser("mine", help="SCAN stage 1: per-class top-K neighbours from a label-free model")
    m.add_argument("--model", required=True, help="label-free model: run/export directory, .safetensors file, "
                   "or timm name with weights (hf-hub:..., local-dir:...)")
    m.add_argument("--data", default="digits", help="ImageFolder root (uses its train/ split) or 'digits'")
    m.add_argument("--data-cache", default=None, help="where 'digits' is rendered")
    m.add_argument("--out", required=True, help="neighbour file to write (.safetensors)")
    m.add_argument("--k", type=int, default=2, help="neighbours per image (default 2, the paper's K)")
    m.add_argument("--arch", default=None, help="architecture, when the weights have no config.json beside them")
    m.add_argument("--image-size", type=int, default=224, help="evaluation crop size (default 224)")
    m.add_argument("--eval-resize", type=int, default=None, help="resize before the crop (default size/0.875)")
    m.add_argument("--batch-size", type=int, default=256)
    m.add_argument("--num-workers", type=int, default=2)
    m.set_defaults(func=_cmd_mine)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"scan-zoo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
