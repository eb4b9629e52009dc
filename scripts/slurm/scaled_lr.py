#!/usr/bin/env python
"""Print a recipe's lr scaled to the global batch of a launch (linear rule; docs/cluster.md).

    python scripts/slurm/scaled_lr.py scan_zoo/recipes/moco_v2_in1k.yaml 32 [--batch-size 32]

The recipe's ``lr`` is its value for ``_meta.processes`` x ``batch_size`` images per step (the batch it was
tuned at); the launch runs PROCESSES x per-process batch (``--batch-size``, default the recipe's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


def main(argv: list[str] | None = None) -> int:
    from scan_zoo.common.errors import UserError
    from scan_zoo.core.schedules import global_batch, scale_lr
    from scan_zoo.train.config import load_yaml

    p = argparse.ArgumentParser(
        prog="scaled_lr.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("recipe")
    p.add_argument("processes", type=int)
    p.add_argument("--batch-size", type=int, default=None, help="images per process (default: the recipe's)")
    args = p.parse_args(argv)
    try:
        recipe = load_yaml(args.recipe)
        meta = (yaml.safe_load(Path(args.recipe).read_text()) or {}).get("_meta", {})
        ref = meta.get("processes")
        ref = ref.get("value") if isinstance(ref, dict) else ref
        if not isinstance(ref, int) or "lr" not in recipe or "batch_size" not in recipe:
            raise UserError(f"{args.recipe} must state lr, batch_size and _meta.processes (the batch its lr is for)")
        per_process = args.batch_size or recipe["batch_size"]
        lr = scale_lr(recipe["lr"], global_batch(per_process, args.processes), global_batch(recipe["batch_size"], ref))
    except (UserError, ValueError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"{lr:.10g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
