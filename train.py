#!/usr/bin/env python
"""Train with SCAN (Supervised Contrastive Adjustment in Neighborhood, Wei et al.) or a baseline.

    scan-zoo-launch train.py                         # the paper's pipeline on the embedded digit scenes
    scan-zoo-launch train.py --data /path/to/imagefolder   # the same pipeline with the ImageNet recipes
    scan-zoo-launch train.py --method moco --data /path/to/imagenet --config moco_v2_in1k
    scan-zoo-launch --multi_gpu --num_processes 2 train.py --max-steps 5 --output-dir runs/smoke

Every option is a field of scan_zoo.train.config.TrainConfig; `--config` reads a YAML recipe (a name
shipped in scan_zoo/recipes, or a file) and the command line overrides it. The pipeline (the default
method) takes each stage's recipe from the data: digits_moco / digits_scan for the embedded digit
scenes, moco_v2_in1k / scan_in1k (lr scaled linearly to the global batch) for an ImageFolder; the
defaults below are those the default run uses. `scan-zoo-launch` is `accelerate launch` with a shipped
one-process config (no warnings) that exits with the script's status (docs/training.md). Not SCAN
clustering (Van Gansbeke et al., 2020).
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from scan_zoo.train.config import add_arguments

    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None, callbacks=()) -> int:
    """Run train.py with ``argv``; ``callbacks`` watch the training (scan_zoo.train.events). Returns the exit
    status: 0, 2 (bad input), 3 (non-finite loss), 75 (preempted or time limit: continue with --resume
    latest), 130 (Ctrl-C)."""
    import logging

    from accelerate import PartialState

    from scan_zoo.common.errors import UserError
    from scan_zoo.train.config import config_from_args
    from scan_zoo.train.interrupt import (
        EXIT_PREEMPTED,
        EXIT_STATUS,
        Interrupted,
        Preempted,
        PreemptedOutside,
        parse_signals,
        preempt_outside,
    )
    from scan_zoo.train.trainer import NonFiniteLoss

    parser = build_parser()
    args = parser.parse_args(argv)
    lost = False
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("scan_zoo").setLevel(logging.INFO)
    try:
        cfg = config_from_args(args)
        with preempt_outside(parse_signals(cfg.preempt_signals)):
            run(cfg, args, callbacks)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"{parser.prog}: training stopped: {e}", file=sys.stderr)
        return 3
    except (Interrupted, Preempted) as e:  # in the training loop: a checkpoint is saved (every process), one line
        if PartialState().is_main_process:
            print(f"{parser.prog}: {e}", file=sys.stderr)
        return EXIT_STATUS if isinstance(e, Interrupted) else EXIT_PREEMPTED
    except PreemptedOutside as e:  # outside the loop (data rendering, mining, evaluation, export)
        if os.environ.get("RANK", "0") == "0":
            print(
                f"{parser.prog}: preempted ({e.signame}) outside the training steps; requeue and continue with "
                "--resume latest",
                file=sys.stderr,
            )
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # Ctrl-C outside the loop (data rendering, mining, evaluation, export)
        if os.environ.get("RANK", "0") == "0":  # one line, from the first process
            print(interrupted_line(parser.prog), file=sys.stderr)
        return EXIT_STATUS
    except RuntimeError as e:  # another process (another node) died or timed out: one line, exit status 4
        from scan_zoo.common.distributed import PEER_LOST_EXIT, peer_lost

        reason = peer_lost(e)
        if reason is None:
            raise
        lost = True
        if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per node
            print(
                f"{parser.prog}: lost contact with another process of this run ({reason}); its checkpoints are "
                "intact: once every node is back, continue with --resume latest",
                file=sys.stderr,
            )
        return PEER_LOST_EXIT
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and not lost:  # after a lost peer it could wait forever
            dist.destroy_process_group()
    return 0


def run(cfg, args, callbacks) -> None:
    """Train (one method, or the pipeline) and print what was made, on the main process."""
    from accelerate import PartialState

    from scan_zoo.common.recipes import recipe_path
    from scan_zoo.experiments.pipeline import format_knn_table, format_timings, run_pipeline, run_training
    from scan_zoo.train.config import RECIPE_FLAGS, load_yaml

    if cfg.method == "pipeline":
        layers = [load_yaml(recipe_path(args.config))] if args.config else []
        layers.append({k: v for k, v in vars(args).items() if k not in RECIPE_FLAGS})
        results = run_pipeline(
            layers, getattr(args, "moco_config", None), getattr(args, "scan_config", None), callbacks
        )
        if PartialState().is_main_process:
            for stage, r in results.items():
                if not r["finished"]:
                    print(f"{stage}: stopped at step {r['steps']}; continue with --resume latest")
            if all("knn" in r for r in results.values()) and len(results) == 2:
                print("\nkNN evaluation on the val split (train split as memory bank):")
                print(format_knn_table(results, cfg.knn_k))
                print("\nexported backbones (plain timm keys):")
                for stage, r in results.items():
                    print(f"  {stage}: {r['weights']}")
            print(format_timings(results))
    else:
        r = run_training(cfg, callbacks)
        if PartialState().is_main_process:
            print(f"{r['method']}: {r['steps']} steps, checkpoint {r['checkpoint']}")
            if r.get("weights"):
                print(f"exported backbone: {r['weights']}")


def interrupted_line(prog: str) -> str:
    """What Ctrl-C outside the training steps prints (exit status 130): nothing of the run's checkpoints is lost."""
    return f"{prog}: interrupted outside the training steps; continue with --resume latest"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while the libraries are imported, or while the process group is closed
        if os.environ.get("RANK", "0") == "0":
            print(interrupted_line("train.py"), file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # 130: scan_zoo.train.interrupt.EXIT_STATUS (not imported here: the interrupt may have hit that import).
        # os._exit skips the interpreter's teardown, which can abort (SIGABRT) on a half-imported extension.
        os._exit(130)
