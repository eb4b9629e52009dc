"""``scan-zoo bench``: the SCAN paper's Table 1 (transfer) and Fig. 3 (K ablation) in miniature, on the digit scenes.

``bench transfer`` trains every method from its recipe (``<recipes-dir>/digits_<method>.yaml``) for
every seed, SCAN starting from -- and mining its neighbours with -- the same seed's MoCo run (as
``scan-zoo build-digits`` does), then scores each backbone with :func:`scan_zoo.eval.transfer.transfer_scores`
(the head seeds are the run's seed). It prints a table shaped like the paper's Table 1 (rows = tasks,
columns = methods, cells = mean +- sample standard deviation over seeds), and writes ``results.json``
(every per-seed number, the recipes, the equivalent ``train.py`` commands, timings, date) and
``transfer.png`` (grouped bars, error bars = one standard deviation). DSC (label-free, dense) trains from
random weights like MoCo and is a fifth column.

``--merge RESULTS`` adds the methods named by ``--methods`` to a finished ``results.json`` (for example the
committed ``results/transfer_digits.json``): that file's runs of every other method are kept as recorded,
neither trained nor scored again (their run directories need not exist any more), and the merged result is
written to ``OUT/results.json`` and ``OUT/transfer.png``. Seeds, ``--quick`` and the transfer settings must be
the ones the file was made with, so every column is measured alike.

``bench k-ablation`` trains SCAN from one MoCo run for each K and scores each:

- ``K = 0``: SCAN's loss with no neighbours: each anchor's only positive is its own other view; the other
  images of the batch stay negatives (in-batch negatives on), so this is MoCo plus in-batch negatives at
  SCAN's schedule and temperature, not MoCo itself (the MoCo run is scored beside it as a reference).
- ``K = all``: every same-class image is a positive: the ``supcon`` method (same-class queue entries are
  positives too) with the SCAN recipe's schedule, and, like every SCAN arm, initialised from the MoCo run
  (the engine initialises only ``scan`` runs from ``init_from``, so this arm calls the trainer's
  initialisation itself; the resolved config records ``init_from``).
- Every arm has the same budget: the SCAN recipe's images per step (``batch_size``) and its number of
  optimiser steps (its epochs at its own K). An "epoch" (every image an anchor once) costs K + 1 times
  more steps at larger K, so equal epochs would give K = 8 nine times the compute of K = 0; equal steps
  keep compute equal and vary only who the positives are. ``epochs`` is raised to cover the steps and
  ``max_steps`` pins the schedule (cosine over the same number of steps for every K).

Runs resume: a finished run (``bench_run.json`` beside its weights, written with the config it was
trained with) is not trained again, and a scored run (``transfer_scores.json``, keyed by the weights'
sha256 and the head settings) is not scored again. A run directory holding a run of another config is
refused rather than mixed. ``--quick`` trains a few steps per method with tiny heads, one seed: a smoke
test of the machinery, not a measurement.
"""

from __future__ import annotations

import logging
from pathlib import Path

from scan_zoo.experiments.bench_runs import METHODS, QUICK_STEPS
from scan_zoo.experiments.k_ablation import format_k_table, run_k_ablation
from scan_zoo.experiments.transfer_bench import format_table, run_transfer_bench


def add_parser(subparsers) -> None:
    """Register ``scan-zoo bench transfer`` and ``scan-zoo bench k-ablation`` on the CLI's sub-parsers."""
    p = subparsers.add_parser(
        "bench", help="benchmarks on the digit scenes: transfer suite (Table 1), K ablation (Fig. 3)"
    )
    sub = p.add_subparsers(dest="bench", required=True)
    t = sub.add_parser("transfer", help="train every method for every seed, score the transfer suite, table + chart")
    t.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods (default: all five)")
    t.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training and head seeds (default 0 1 2)")
    t.add_argument("--out", default="runs/bench/transfer", help="run directories, results.json, transfer.png")
    t.add_argument(
        "--merge",
        default=None,
        metavar="RESULTS_JSON",
        help="add --methods to this finished results.json (its other methods kept, not retrained); "
        "the merged result goes to OUT",
    )
    _common(t)
    t.set_defaults(func=_cmd_transfer)
    k = sub.add_parser("k-ablation", help="SCAN at several K from one MoCo run, equal budgets; scores + line plot")
    k.add_argument(
        "--ks",
        nargs="+",
        default=["0", "1", "2", "4", "8", "all"],
        help="values of K; 'all' = every same-class image (supcon with SCAN's schedule)",
    )
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--out", default="runs/bench/k_ablation", help="run directories, results.json, k_ablation.png")
    k.add_argument(
        "--moco-run",
        default=None,
        help="a finished MoCo run to start from (default: train one from digits_moco.yaml into OUT/seed<seed>/moco)",
    )
    _common(k)
    k.set_defaults(func=_cmd_k_ablation)


def _common(p) -> None:
    p.add_argument(
        "--recipes-dir",
        default=None,
        help="folder of digits_<method>.yaml (default: the recipes shipped in scan_zoo/recipes)",
    )
    p.add_argument(
        "--quick", action="store_true", help=f"smoke test: one seed, {QUICK_STEPS} steps per run, tiny heads"
    )
    p.add_argument("--data-cache", default=None, help="where 'digits' is rendered (default ~/.cache/scan_zoo/digits)")
    p.add_argument("--num-workers", type=int, default=2)


def _logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("scan_zoo").setLevel(logging.INFO)


def _command(args, name: str, flags: dict) -> str:
    parts = ["scan-zoo", "bench", name]
    for flag, value in flags.items():
        if value is None or value is False:
            continue
        parts.append(
            flag
            if value is True
            else f"{flag} " + (" ".join(map(str, value)) if isinstance(value, list) else str(value))
        )
    return " ".join(parts)


def _cmd_transfer(args) -> int:
    _logging()
    command = _command(
        args,
        "transfer",
        {
            "--methods": args.methods,
            "--seeds": args.seeds,
            "--out": args.out,
            "--recipes-dir": args.recipes_dir,
            "--quick": args.quick,
            "--data-cache": args.data_cache,
            "--merge": args.merge,
        },
    )
    result = run_transfer_bench(
        args.methods,
        args.seeds,
        args.out,
        args.recipes_dir,
        args.quick,
        args.data_cache,
        args.num_workers,
        command,
        merge=args.merge,
    )
    print(
        f"\nTransfer on the digit scenes ({len(result['seeds'])} seed(s){', QUICK' if result['quick'] else ''}); "
        "mean +- std over seeds, * = best:"
    )
    print(format_table(result["summary"], result["methods"]))
    print(f"\nresults: {Path(args.out) / 'results.json'}; chart: {result['chart']} ({result['total_seconds']:.0f} s)")
    return 0


def _cmd_k_ablation(args) -> int:
    _logging()
    command = _command(
        args,
        "k-ablation",
        {
            "--ks": args.ks,
            "--seed": args.seed,
            "--out": args.out,
            "--moco-run": args.moco_run,
            "--recipes-dir": args.recipes_dir,
            "--quick": args.quick,
            "--data-cache": args.data_cache,
        },
    )
    result = run_k_ablation(
        args.ks,
        args.seed,
        args.out,
        args.recipes_dir,
        args.moco_run,
        args.quick,
        args.data_cache,
        args.num_workers,
        command,
    )
    print(
        f"\nSCAN K ablation (seed {result['seed']}, {result['budget']['steps']} steps per K"
        f"{', QUICK' if result['quick'] else ''}):"
    )
    print(format_k_table(result))
    print(f"\nresults: {Path(args.out) / 'results.json'}; chart: {result['chart']} ({result['total_seconds']:.0f} s)")
    return 0
