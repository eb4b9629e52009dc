"""Every number the zoo publishes is re-measured by the command printed beside it.

For each shipped registry entry: the command its card prints is run as a fresh process (fresh feature cache),
and its printed kNN and linear top-1 are compared with the entry's ``eval_results.json``, its card's results
table and the README's zoo table: kNN exactly (at the precision each shows), linear top-1 within the
tolerance the card states.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess

import pytest
from helpers import PYTHON, ROOT

from scan_zoo.zoo.registry import ENTRIES

SHIPPED = [e for e in ENTRIES if e.shipped]
REPRODUCE = re.compile(r"Reproduce: `([^`]+)` prints these numbers: kNN exactly, linear top-1 within ([0-9.]+) points")


def card_row(card: str, protocol: str) -> list[str]:
    """The cells of ``protocol``'s row in a card's results table."""
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == protocol:
            return cells
    raise AssertionError(f"no {protocol} row in the card's results table")


def readme_row(name: str) -> list[str]:
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(f"| `{name}` |"):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"{name} is not in the README's zoo table")


def printed_row(stdout: str, protocol: str) -> dict:
    """eval_linear.py's result table: header line, dashes, one row."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    head = next(i for i, ln in enumerate(lines) if ln.startswith("protocol  data"))
    row = lines[head + 2].split()
    assert row[0] == protocol, lines[head : head + 3]
    return {"top1": float(row[2]), "knn": float(row[4])}


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory):
    """One empty cache for the module: the digits are rendered once, every entry's features extracted anew."""
    return tmp_path_factory.mktemp("scan_zoo_cache")


@pytest.mark.slow
@pytest.mark.parametrize("entry", SHIPPED, ids=[e.name for e in SHIPPED])
def test_printed_command_reproduces_the_published_numbers(entry, tmp_path, fresh_cache):
    card = (entry.weights_dir / "README.md").read_text()
    found = REPRODUCE.search(card)
    assert found, "the card prints no command for its numbers"
    command, tolerance = found.group(1), float(found.group(2))
    argv = shlex.split(command)
    assert argv[:2] == ["python", "eval_linear.py"], command
    readme = (ROOT / "README.md").read_text()
    assert "`python eval_linear.py NAME` re-measures each" in readme  # the same command, beside the table
    assert argv[2:] == [entry.name]

    # exactly the printed command, in a scratch directory (its default --out goes there) with a fresh cache
    proc = subprocess.run(
        [PYTHON, str(ROOT / "eval_linear.py"), *argv[2:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "SCAN_ZOO_CACHE": str(fresh_cache)},
    )
    assert proc.returncode == 0, proc.stderr
    got = printed_row(proc.stdout, "cached")

    shipped = json.loads((entry.weights_dir / "eval_results.json").read_text())["cached"]
    assert shipped["reproduce"]["command"] == command
    assert shipped["reproduce"]["linear_top1_tolerance"] == tolerance
    assert got["knn"] == round(shipped["knn"]["top1"], 2)
    assert abs(got["top1"] - shipped["top1"]) <= tolerance + 0.005  # printed at 2 decimals

    cells = card_row(card, "cached")  # protocol, top-1, top-5, kNN top-1, ...
    assert float(cells[3]) == got["knn"]
    assert abs(float(cells[1]) - got["top1"]) <= tolerance + 0.01

    row = readme_row(entry.name)  # name, method, data, weights, linear top-1 (protocol), kNN top-1, recipe
    # the table rounds the full-precision results (rounding the card's 2 decimals again could differ: 96.4485)
    assert row[4] == f"{shipped['top1']:.1f} (cached)" and row[5] == f"{shipped['knn']['top1']:.1f}"
    assert abs(float(row[4].split()[0]) - got["top1"]) <= tolerance + 0.05  # shown at 1 decimal
