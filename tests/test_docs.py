"""The newcomer's pages: README.md and docs/*.md link only to files that exist, their generated parts are
current, and the README stays a short front page."""

import re
from pathlib import Path

import pytest

from scan_zoo.experiments.results_page import update_readme

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # markdown links and images, anchors dropped


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_at_files_that_exist(page):
    targets = [t for t in LINK.findall(page.read_text()) if "://" not in t]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_every_docs_page_is_reachable_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_results_page_is_generated_from_the_committed_json():
    text = (ROOT / "docs" / "results.md").read_text()
    assert update_readme(text, ROOT) == text, "docs/results.md is stale: run `scan-zoo readme`"


def test_readme_is_a_front_page():
    size = len((ROOT / "README.md").read_bytes())
    assert size < 15_000, f"README.md is {size} bytes; move detail into docs/"
