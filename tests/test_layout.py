"""The package layout: one subpackage per stage family, shared plumbing beside them, no import circles."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = {"pipeline.params", "pipeline.tracking", "pipeline.cluster", "pipeline.storage"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules that `path` imports, at module level or inside functions (lazy imports count:
    a circle through a lazy import is still a circle in the design)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in known:
                found.add(name)
    return found


def graph(package: str) -> dict[str, set[str]]:
    files = {module_name(p): p for p in (ROOT / package).rglob("*.py")}
    known = set(files) | {module_name(p) for p in (ROOT / "stm_core").rglob("*.py")}
    return {name: imports(path, known) - {name} for name, path in files.items()}


def test_no_import_circles_in_pipeline() -> None:
    g = graph("pipeline")
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if nxt not in g:
                continue
            if state.get(nxt) == 1:
                circle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)


def test_stage_families_are_subpackages_and_shared_helpers_import_no_stage() -> None:
    for family in ("download", "train", "evaluate", "report"):
        assert (ROOT / "pipeline" / family / "__init__.py").is_file(), family
    flat = sorted(p.name for p in (ROOT / "pipeline").glob("*.py"))
    assert not [n for n in flat if n.startswith(("train_", "eval_"))], flat
    g = graph("pipeline")
    for helper in SHARED:
        stage_imports = {m for m in g.get(helper, set()) if not m.startswith("stm_core") and m not in SHARED}
        assert not stage_imports, f"{helper} imports stage modules {stage_imports}"


def test_stm_core_never_imports_pipeline() -> None:
    for path in (ROOT / "stm_core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                pytest.fail(f"{path}: imports {node.module}")
            if isinstance(node, ast.Import) and any(a.name.startswith("pipeline") for a in node.names):
                pytest.fail(f"{path}: imports pipeline")


def test_every_command_module_exposes_the_cli_interface() -> None:
    from pipeline.cli import COMMANDS

    assert set(COMMANDS) >= {"download", "synthesize", "train", "evaluate", "report", "segment", "score"}
    for name, module in COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(getattr(mod, "add_arguments", None)) and callable(getattr(mod, "run", None)), name
        assert (mod.__doc__ or "").strip(), f"{module}: the docstring is the command's help"


def test_dvc_deps_name_files_that_exist() -> None:
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        for dep in body.get("deps", []):
            if "${" in dep or not dep.startswith(("pipeline", "stm_core")):
                continue
            assert (ROOT / dep).exists(), f"dvc.yaml stage {name}: dependency {dep} does not exist"
