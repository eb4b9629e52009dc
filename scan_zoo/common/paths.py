"""Where the package's own data lies, named once.

``PACKAGE_DIR`` holds package data (the shipped ``weights/``, ``zoo_lock.json`` and ``recipes/``), found
through :mod:`importlib.resources` so it is right wherever the package is installed. Files outside the
package (measured results, run directories) are always explicit paths given by the caller.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

PACKAGE_DIR = Path(str(files("scan_zoo")))
