"""The ``scan-zoo`` command: data, stage-1 mining, the zoo (list, export, publish, README table), converters."""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import pickle
import sys
from pathlib import Path

from scan_zoo.common.errors import UserError
from scan_zoo.data import datasets as data_lib
from scan_zoo.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from scan_zoo.data.digits import render_digits
from scan_zoo.eval.retrieval import add_parser as add_retrieve_parser
from scan_zoo.experiments.bench import add_parser as add_bench_parser
from scan_zoo.experiments.results_page import update_readme
from scan_zoo.experiments.user_export import export_run
from scan_zoo.experiments.zoo_build import build_digits
from scan_zoo.models.backbones import (
    create_backbone,
    data_config_for,
    export_backbone,
)
from scan_zoo.models.convert import detect_layout, read_checkpoint, to_detectron2, to_timm
from scan_zoo.train.mining import check_k, mine_dataset
from scan_zoo.zoo.cards import headline, metrics_summary
from scan_zoo.zoo.hub import export, publish
from scan_zoo.zoo.registry import ENTRIES


def _cmd_data(args) -> int:
    out = render_digits(args.out, renders=args.renders, size=args.size, seed=args.seed)
    print(f"digit scenes written to {out} (train/ and val/ ImageFolder trees, metadata.npz)")
    return 0


def _cmd_mine(args) -> int:
    check_k(args.k)  # before the data are rendered or listed
    root = data_lib.resolve_data_root(args.data, args.data_cache)
    out = Path(args.out)
    mine_dataset(
        args.model,
        root,
        out,
        args.k,
        args.image_size,
        args.eval_resize,
        arch=args.arch,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    print(f"neighbour table (K={args.k}) written to {out}")
    return 0


def _cmd_convert_timm(args) -> int:
    state = read_checkpoint(args.checkpoint)
    layout = detect_layout(state)
    weights = to_timm(state, args.arch, layout, source=str(args.checkpoint))
    model = create_backbone(args.arch)
    model.load_state_dict(weights, strict=True)
    out = export_backbone(
        model,
        Path(args.out),
        data_config_for(args.image_size, None, IMAGENET_MEAN, IMAGENET_STD),
        {"converted_from": str(args.checkpoint), "layout": layout},
    )
    print(f"{layout} checkpoint -> {out} ({len(weights)} tensors, plain timm keys for {args.arch})")
    return 0


def _cmd_convert_detectron2(args) -> int:

    src = Path(args.weights)
    state = read_checkpoint(src / "model.safetensors" if src.is_dir() else src)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        pickle.dump(to_detectron2(state), f)
    print(f"detectron2 weights written to {out} (load with MODEL.WEIGHTS {out}, MODEL.PIXEL_MEAN/STD as timm's)")
    return 0


def _cmd_list(args) -> int:

    rows = [e for e in ENTRIES if fnmatch.fnmatch(e.name, args.pattern) and (e.has_weights or not args.with_weights)]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": e.name,
                        "method": e.method,
                        "status": e.status,
                        "data": e.data,
                        "recipe": e.recipe_command,
                        "metrics": e.metrics,
                        "reported": e.reported,
                        **{k: e.facts.get(k) for k in ("hf_hub_id", "revision", "sha256")},
                    }
                    for e in rows
                ],
                indent=2,
            )
        )
        return 0
    table = [("name", "method", "weights", "metrics")] + [
        (e.name, e.method, e.status, metrics_summary(e)) for e in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 7)
    print(
        f"\n{len(rows)} entries; 'shipped' load offline, 'published' download at a pinned revision, "
        "'recipe' has no weights yet."
    )
    return 0


def _cmd_export(args) -> int:
    if any(e.name == args.name for e in ENTRIES):  # a zoo entry: checked against its registry recipe
        if args.out is None:
            raise UserError(f"--out is required when exporting the zoo entry {args.name}")
        out = export(args.run_dir, args.name, args.out)
    else:  # the user's own run under ORG/MODEL: the card describes that run
        out = export_run(args.run_dir, args.name, args.out or f"runs/export/{args.name}", force=args.force)
    print(f"{args.name} exported to {out} (model.safetensors, config.json, README.md)")
    return 0


def _cmd_publish(args) -> int:
    r = publish(args.folder, args.repo_id, endpoint=args.endpoint, private=args.private, record_lock=not args.no_record)
    print(f"published {r['name']} to {r['repo_id']} at revision {r['revision']}")
    print(f"  commit: {r['commit_url']}")
    print(f"  sha256: {r['sha256']}")
    if "lock" in r:
        print(f"  recorded in {r['lock']}; run `scan-zoo readme` to refresh the README's zoo table")
    return 0


def _cmd_readme(args) -> int:
    root = Path(args.path).resolve().parent  # the checkout the README lies in: results/*.json beside it
    stale = []
    for path in (Path(args.path), Path(args.results)):
        if path == Path(args.results) and not path.is_file():
            continue  # an installed package has no docs/
        text = path.read_text()
        new = update_readme(text, root)
        if new == text:
            print(f"{path}: the generated parts are up to date")
        elif args.check:
            stale.append(path)
        else:
            path.write_text(new)
            print(f"{path}: generated parts regenerated from the registry and results/*.json")
    for path in stale:
        print(f"{path}: the generated parts are out of date; run `scan-zoo readme`", file=sys.stderr)
    return 1 if stale else 0


def _cmd_build_digits(args) -> int:

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("scan_zoo").setLevel(logging.INFO)
    built = build_digits(args.work_dir, args.only, num_workers=args.num_workers)
    for b in built:
        linear, knn = headline(b["results"])
        print(
            f"{b['name']}: linear top-1 {linear}, kNN top-1 {knn}; shipped in {b['folder']} (sha256 {b['sha256'][:12]})"
        )
    readme = Path(args.readme)
    if readme.is_file():
        readme.write_text(update_readme(readme.read_text(), readme.resolve().parent))
        print(f"{readme}: zoo table regenerated")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scan-zoo",
        description="SCAN (Supervised Contrastive Adjustment in "
        "Neighborhood, Wei et al.) model zoo tools. Not SCAN clustering (Van Gansbeke et al.).",
    )
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
    m.add_argument(
        "--model",
        required=True,
        help="label-free model: run/export directory, .safetensors file, "
        "or timm name with weights (hf-hub:..., local-dir:...)",
    )
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

    c = sub.add_parser("convert", help="convert checkpoints: MoCo v1/v2/v3 or scan_zoo -> timm; timm -> detectron2")
    csub = c.add_subparsers(dest="target", required=True)
    ct = csub.add_parser("timm", help="a MoCo v1/v2/v3 .pth.tar or a scan_zoo checkpoint -> model.safetensors")
    ct.add_argument("checkpoint", help="checkpoint file (.pth, .pth.tar or .safetensors)")
    ct.add_argument("--arch", default="resnet50", help="timm architecture (default resnet50)")
    ct.add_argument("--out", required=True, help="output directory (model.safetensors + config.json)")
    ct.add_argument("--image-size", type=int, default=224, help="evaluation crop size recorded in config.json")
    ct.set_defaults(func=_cmd_convert_timm)
    cd = csub.add_parser("detectron2", help="a timm ResNet backbone -> detectron2 .pkl (MoCo's key mapping)")
    cd.add_argument("weights", help="model.safetensors or a directory holding it")
    cd.add_argument("--out", required=True, help="output .pkl file")
    cd.set_defaults(func=_cmd_convert_detectron2)

    ls = sub.add_parser("list", help="the zoo's entries, whether their weights exist, and their metrics")
    ls.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. '*scan*'")
    ls.add_argument("--with-weights", action="store_true", help="only entries whose weights can be loaded")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_cmd_list)

    ex = sub.add_parser("export", help="a training run -> a zoo model folder (weights, config.json, model card)")
    ex.add_argument("run_dir", help="run directory holding model.safetensors and config.json (train.py's output)")
    ex.add_argument(
        "--name",
        required=True,
        help="a zoo name <arch>.<tag> (scan-zoo list), or ORG/MODEL for your "
        "own run (its card then describes that run)",
    )
    ex.add_argument(
        "--out", default=None, help="output folder (required for a zoo name; ORG/MODEL: default runs/export/ORG/MODEL)"
    )
    ex.add_argument("--force", action="store_true", help="ORG/MODEL: replace the export files of a non-empty --out")
    ex.set_defaults(func=_cmd_export)

    pb = sub.add_parser("publish", help="upload an exported folder to the Hugging Face Hub; record its revision")
    pb.add_argument("folder", help="folder made by scan-zoo export")
    pb.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub (created if needed)")
    pb.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    pb.add_argument("--private", action="store_true", help="create the repository as private")
    pb.add_argument("--no-record", action="store_true", help="do not record revision and sha256 in the zoo lock")
    pb.set_defaults(func=_cmd_publish)

    rd = sub.add_parser(
        "readme", help="regenerate the README's zoo table and docs/results.md from the registry and results/*.json"
    )
    rd.add_argument("--path", default="README.md", help="the page holding the zoo table (default README.md)")
    rd.add_argument("--results", default="docs/results.md", help="the page holding the results section")
    rd.add_argument("--check", action="store_true", help="exit 1 if the table is out of date, change nothing")
    rd.set_defaults(func=_cmd_readme)

    bd = sub.add_parser("build-digits", help="train, evaluate and ship the *_digits zoo weights from their recipes")
    bd.add_argument("--work-dir", default="runs/zoo_digits", help="run directories (resumed if present)")
    bd.add_argument("--only", nargs="*", default=None, help="zoo names to build (default: all shipped entries)")
    bd.add_argument("--num-workers", type=int, default=2)
    bd.add_argument("--readme", default="README.md", help="README whose zoo table is regenerated afterwards")
    bd.set_defaults(func=_cmd_build_digits)

    add_retrieve_parser(sub)
    add_bench_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"scan-zoo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
