"""Fixtures shared by the tests; the plain helpers they use live in tests/helpers.py."""

from pathlib import Path

import pytest
from helpers import make_image_folder


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from scan_zoo.data.digits import render_digits

    return render_digits(tmp_path_factory.mktemp("digits") / "digits", progress=False)
