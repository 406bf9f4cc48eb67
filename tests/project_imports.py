"""The project's own import graph, read from the source (shared by tests/test_layout.py and
tests/test_dvc_stages.py): module-level and in-function imports both count."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def module_files(*packages: str) -> dict[str, Path]:
    """dotted module name -> file, for every module under the given top-level packages."""
    return {module_name(p): p for package in packages for p in (ROOT / package).rglob("*.py")}


def imported_names(path: Path) -> list[str]:
    """Every absolute dotted name `path` imports: `from a.b import c` gives a.b and a.b.c."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names
