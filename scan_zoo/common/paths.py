"""Where the package's own files and the checkout's recipes lie, named once.

``PACKAGE_DIR`` holds package data (the shipped ``weights/`` and ``zoo_lock.json``), found through
:mod:`importlib.resources` so it is right wherever the package is installed. ``CHECKOUT`` is the source
checkout the package was installed from in editable mode (``pip install -e .``): the recipes in
``configs/`` and the measured ``results/`` live there, not in the package; code that reads them says so
in its error when they are missing (an installed wheel has no checkout).
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

PACKAGE_DIR = Path(str(files("scan_zoo")))
CHECKOUT = PACKAGE_DIR.parent
RECIPES_DIR = CHECKOUT / "configs"
