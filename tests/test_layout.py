"""The package layout: one subpackage per stage family, shared plumbing beside them, no import circles."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from project_imports import ROOT, imported_names, module_files

SHARED = {"pipeline.params", "pipeline.tracking", "pipeline.cluster", "pipeline.storage"}


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules that `path` imports, at module level or inside functions (lazy imports count:
    a circle through a lazy import is still a circle in the design)."""
    return set(imported_names(path)) & known


def graph(package: str) -> dict[str, set[str]]:
    files = module_files(package)
    known = set(files) | set(module_files("stm_core"))
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
    for path in module_files("stm_core").values():
        bad = [n for n in imported_names(path) if n == "pipeline" or n.startswith("pipeline.")]
        assert not bad, f"{path}: imports {bad[0]}"


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


# The README's layout section: a tree of folders (`name/`) and files (`name.py`). A folder's line may
# list its files after the name; lines indented to the description column continue the line above.
DESCRIPTION_COLUMN = 20


def readme_layout() -> set[str]:
    import re

    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Layout\s*$(.*?)(?=^## |\Z)", text, re.S | re.M).group(1)
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    named: set[str] = set()
    stack: list[tuple[int, str]] = []  # (indent, folder path) of the open folders
    context = ""  # the folder a continuation line belongs to
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent >= DESCRIPTION_COLUMN:  # continues the folder line above
            named |= {context + n for n in re.findall(r"\b[\w]+\.py\b", line)}
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        token, rest = (line.split(None, 1) + [""])[:2]
        if token.endswith("/"):
            context = parent + token
            stack.append((indent, context))
            named |= {context + n for n in re.findall(r"\b[\w]+\.py\b", rest)}
        elif token.endswith(".py"):
            named.add(parent + token)
            context = parent
    return named


def test_readme_layout_names_every_module() -> None:
    named = readme_layout()
    modules = {str(p.relative_to(ROOT)) for package in ("stm_core", "pipeline")
               for p in (ROOT / package).rglob("*.py") if p.name != "__init__.py"}
    missing = sorted(modules - named)
    assert not missing, f"README.md, ## Layout: modules not listed: {missing}"
    stale = sorted(n for n in named if n.startswith(("stm_core/", "pipeline/")) and n not in modules)
    assert not stale, f"README.md, ## Layout: lists modules that do not exist: {stale}"


def test_the_layout_reader_places_files_in_their_folders(tmp_path, monkeypatch) -> None:
    readme = "# x\n\n## Layout\n\n```\npkg/\n  sub/       a.py (one), b.py\n" + " " * 22 + "c.py\n  d.py  top\n```\n"
    (tmp_path / "README.md").write_text(readme)
    import test_layout

    monkeypatch.setattr(test_layout, "ROOT", tmp_path)
    assert test_layout.readme_layout() == {"pkg/sub/a.py", "pkg/sub/b.py", "pkg/sub/c.py", "pkg/d.py"}
