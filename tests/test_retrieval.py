"""The retrieval figure: retrieve() against a naive loop, query choice, and the PNG/JSON it writes."""

import argparse
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import make_image_folder
from PIL import Image

from scan_zoo.eval import retrieval as R
from scan_zoo.eval import retrieval_figure as RF


def naive_topk(queries, gallery, k, exclude=None):
    """Cosine similarity by explicit loops; [(sim, index)] * k per query, best first."""
    out = []
    for qi, q in enumerate(queries):
        scored = []
        for gi, g in enumerate(gallery):
            if exclude is not None and exclude[qi] == gi:
                continue
            dot = sum(float(a) * float(b) for a, b in zip(q, g))
            norm = (sum(float(a) ** 2 for a in q) ** 0.5) * (sum(float(b) ** 2 for b in g) ** 0.5)
            scored.append((dot / norm, gi))
        scored.sort(key=lambda t: -t[0])
        sims = [s for s, _ in scored]
        assert len(set(round(s, 6) for s in sims[: k + 1])) == len(sims[: k + 1]), "test data has ties"
        out.append(scored[:k])
    return out


@pytest.mark.parametrize("chunk,query_chunk", [(8192, 1024), (16, 3), (1, 1)])
def test_retrieve_matches_naive_loop(chunk, query_chunk):
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(7, 8, generator=g) * 3  # unnormalised on purpose
    gallery = torch.randn(50, 8, generator=g)
    sims, idx = R.retrieve(queries, gallery, 4, chunk=chunk, query_chunk=query_chunk)
    assert sims.shape == idx.shape == (7, 4) and idx.dtype == torch.long
    expected = naive_topk(queries, gallery, 4)
    assert idx.tolist() == [[i for _, i in row] for row in expected]
    assert torch.allclose(sims, torch.tensor([[s for s, _ in row] for row in expected]), atol=1e-5)


@pytest.mark.parametrize("chunk", [8192, 5])
def test_retrieve_excludes_self(chunk):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(20, 6, generator=g)
    own = torch.arange(20)
    own[3] = -1  # nothing excluded for query 3: it finds itself first
    sims, idx = R.retrieve(feats, feats, 3, exclude_self=own, chunk=chunk)
    for q in range(20):
        if q != 3:
            assert q not in idx[q].tolist()
    assert idx[3, 0] == 3 and sims[3, 0] == pytest.approx(1.0, abs=1e-5)
    expected = naive_topk(feats, feats, 3, exclude=own.tolist())
    assert idx.tolist() == [[i for _, i in row] for row in expected]


def test_retrieve_rejects_too_large_k():
    with pytest.raises(ValueError):
        R.retrieve(torch.randn(2, 4), torch.randn(3, 4), 4)
    with pytest.raises(ValueError):  # one of the three is the query itself
        R.retrieve(torch.randn(3, 4), torch.randn(3, 4), 3, exclude_self=torch.arange(3))


def test_choose_queries_deterministic_and_spread():
    labels = [0] * 10 + [1] * 20 + [2] * 5 + [3] * 30
    a = R.choose_queries(labels, 10, seed=0)
    assert a == R.choose_queries(labels, 10, seed=0)
    assert len(set(a)) == 10
    counts = Counter(labels[i] for i in a)
    assert set(counts) == {0, 1, 2, 3} and max(counts.values()) - min(counts.values()) <= 1
    assert [labels[i] for i in a] == sorted(labels[i] for i in a), "rows are ordered by class"
    assert any(R.choose_queries(labels, 10, seed=s) != a for s in range(1, 5))
    few = R.choose_queries(labels, 3, seed=0)
    assert len({labels[i] for i in few}) == 3
    # a class that runs out leaves its share to the others
    small = [0] + [1] * 20
    got = R.choose_queries(small, 8, seed=0)
    assert Counter(small[i] for i in got) == {0: 1, 1: 7}
    with pytest.raises(ValueError):
        R.choose_queries([0, 1], 3)


def _export_random(out: Path, seed: int) -> Path:
    from scan_zoo.data.datasets import IMAGENET_MEAN, IMAGENET_STD
    from scan_zoo.models.backbones import (
        create_backbone,
        data_config_for,
        export_backbone,
    )

    torch.manual_seed(seed)
    model = create_backbone("test_resnet")
    export_backbone(model, out, data_config_for(16, 16, IMAGENET_MEAN, IMAGENET_STD), {"method": "test"})
    return out


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    return root, [_export_random(root / "alpha", 0), _export_random(root / "beta", 1)]


def test_run_retrieval_writes_figure_and_json(tmp_path, two_models):
    _, models = two_models
    data = make_image_folder(tmp_path / "data", classes=3, per_class=10, size=16, val_per_class=4)
    out = tmp_path / "figs" / "grid.png"
    queries, k = 5, 3
    result = R.run_retrieval(
        [str(m) for m in models], data=str(data), queries=queries, k=k, out=out, seed=0, num_workers=0, progress=False
    )
    assert out.is_file() and out.stat().st_size > 0
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(result))

    # size: query column + one group of k framed images per model; header, rows with captions, legend
    cell = RF.TILE + 2 * RF.FRAME
    width = 2 * RF.MARGIN + cell + 2 * (RF.GROUP_GAP + k * cell + (k - 1) * RF.GAP)
    height = (
        2 * RF.MARGIN
        + RF.HEADER_LINES * RF.LINE
        + RF.ROW_GAP
        + queries * (cell + RF.LINE)
        + (queries - 1) * RF.ROW_GAP
        + RF.ROW_GAP
        + RF.LEGEND_LINES * RF.LINE
    )
    img = Image.open(out).convert("RGB")
    assert img.size == (width, height) == tuple(result["image_size"])

    assert [m["name"] for m in result["models"]] == ["alpha", "beta"]
    q_labels = [q["label"] for q in result["queries"]]
    assert len(q_labels) == queries and len(set(q_labels)) == 3  # spread over the 3 classes
    colours = Counter()
    for m, model in enumerate(result["models"]):
        assert len(model["neighbors"]) == queries
        same = 0
        for row, neighbours in enumerate(model["neighbors"]):
            assert len(neighbours) == k
            sims = [n["similarity"] for n in neighbours]
            assert sims == sorted(sims, reverse=True)
            for r, n in enumerate(neighbours):
                assert Path(n["path"]).parent.name == result["classes"][n["label"]]  # label is the file's class
                assert Path(n["path"]).parts[-3] == "train"
                assert n["same_class"] == (n["label"] == q_labels[row])
                same += n["same_class"]
                x0, y0, x1, y1 = n["box"]
                expect_x = (
                    RF.MARGIN
                    + cell
                    + RF.GROUP_GAP
                    + m * (RF.GROUP_GAP + k * cell + (k - 1) * RF.GAP)
                    + r * (cell + RF.GAP)
                )
                expect_y = RF.MARGIN + RF.HEADER_LINES * RF.LINE + RF.ROW_GAP + row * (cell + RF.LINE + RF.ROW_GAP)
                assert (x0, y0, x1, y1) == (expect_x, expect_y, expect_x + cell, expect_y + cell)
                colour = RF.GREEN if n["same_class"] else RF.RED
                for px in [(x0, y0), (x0 + 1, y0 + cell // 2), (x1 - 1, y1 - 1), (x0 + cell // 2, y1 - 2)]:
                    assert img.getpixel(px) == colour, (m, row, r, px)
                colours[colour] += 1
                assert img.getpixel((x0 - 1, y0)) == RF.BACKGROUND  # the frame starts at the box
        assert model["precision_at_k"]["shown"] == same / (queries * k)
        assert model["precision_at_k"]["val_images"] == 12
    assert sum(colours.values()) == 2 * queries * k

    # precision over all val images, from an independent feature extraction and a naive top-k
    from scan_zoo.eval.probe import load_splits

    train, val = load_splits(data)
    feats = R.model_features(str(models[0]), train, val, str(data), num_workers=0, progress=False)
    top = naive_topk(feats["val"], feats["train"], k)
    hits = sum(train.targets[i] == val.targets[q] for q, row in enumerate(top) for _, i in row)
    assert result["models"][0]["precision_at_k"]["all_val"] == pytest.approx(hits / (len(val) * k))


def test_cli_parser_runs(tmp_path, two_models, capsys):
    _, models = two_models
    data = make_image_folder(tmp_path / "data", classes=2, per_class=6, size=16, val_per_class=2)
    parser = argparse.ArgumentParser()
    R.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "r.png"
    args = parser.parse_args(
        [
            "retrieve",
            "--models",
            str(models[1]),
            "--queries",
            "2",
            "--k",
            "2",
            "--data",
            str(data),
            "--out",
            str(out),
            "--num-workers",
            "0",
            "--names",
            "random",
        ]
    )
    assert args.func(args) == 0
    assert str(out) in capsys.readouterr().out
    assert Image.open(out).size == RF.Layout(2, 1, 2).size
    assert json.loads(out.with_suffix(".json").read_text())["models"][0]["name"] == "random"


def test_default_output_goes_under_runs_not_the_current_directory(tmp_path, two_models, capsys, monkeypatch):
    _, models = two_models
    data = make_image_folder(tmp_path / "data", classes=2, per_class=6, size=16, val_per_class=2)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    parser = argparse.ArgumentParser()
    R.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "retrieve",
            "--models",
            str(models[1]),
            str(models[0]),
            "--queries",
            "2",
            "--k",
            "2",
            "--data",
            str(data),
            "--num-workers",
            "0",
            "--names",
            "a/../b",
            "plain",
        ]
    )
    assert args.func(args) == 0
    written = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
    assert written == ["runs/retrieval/a_.._b+plain/retrieval.json", "runs/retrieval/a_.._b+plain/retrieval.png"]
    assert "runs/retrieval/a_.._b+plain/retrieval.png" in capsys.readouterr().out
    assert (
        R.default_out(["x" * 300]).parent.name.startswith("x" * 80)
        and len(R.default_out(["x" * 300]).parent.name) < 100
    )
