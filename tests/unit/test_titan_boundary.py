"""torchtitan is imported only inside ``phi4_engine/titan/`` (its extension points may change,
FACTS.md §5; the compat shims must run before any torchtitan import)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCANNED = ["phi4_engine", "plugins", "stages", "bench", "examples"]
ALLOWED = REPO / "phi4_engine" / "titan"


def _imports_torchtitan(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(name == "torchtitan" or name.startswith("torchtitan.") for name in names):
            lines.append(node.lineno)
    return lines


def _python_files() -> list[Path]:
    files = []
    for folder in SCANNED:
        root = REPO / folder
        if root.is_dir():
            files.extend(sorted(root.rglob("*.py")))
    return files


def test_scan_finds_files_and_detects_imports():
    assert any(path.is_relative_to(ALLOWED) for path in _python_files())
    assert _imports_torchtitan(ast.parse("import os, torchtitan.trainer as t")) == [1]
    assert _imports_torchtitan(ast.parse("def f():\n    from torchtitan import config")) == [2]
    not_imports = "# import torchtitan\nx = 'from torchtitan import a'"
    assert _imports_torchtitan(ast.parse(not_imports)) == []
    assert _imports_torchtitan(ast.parse("import torchtitanic\nfrom .torchtitan import x")) == []


def test_torchtitan_is_imported_only_in_phi4_engine_titan():
    offenders = []
    for path in _python_files():
        if path.is_relative_to(ALLOWED):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line in _imports_torchtitan(tree):
            offenders.append(f"{path.relative_to(REPO)}:{line}")
    assert not offenders, (
        "torchtitan may only be imported inside phi4_engine/titan/; move these imports "
        "behind an adapter there:\n  " + "\n  ".join(offenders)
    )
