"""The hand-written stub ``_core.pyi`` names exactly what the compiled module exports."""

from __future__ import annotations

import ast
from pathlib import Path

from alsiron import _core


def test_stub_matches_compiled_module():
    stub = Path(__file__).resolve().parents[1] / "python" / "alsiron" / "_core.pyi"
    tree = ast.parse(stub.read_text())
    stubbed = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    exported = {n for n in dir(_core) if not n.startswith("_") and callable(getattr(_core, n))}
    assert stubbed == exported
