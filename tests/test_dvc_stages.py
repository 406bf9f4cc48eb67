"""dvc.yaml against the code: each stage depends on exactly the code its command imports, and on no
placement key. (Which params each stage really reads: tests/test_dvc_pipeline.py, from a real run.)

The imports are found the way tests/test_layout.py finds them (module level and inside functions,
from the stage's command module down); `pipeline/cli.py` only dispatches to that module, so no
stage depends on it. Package `__init__.py` files that hold only a docstring are not code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from project_imports import ROOT, imported_names, module_files

from pipeline.cli import COMMANDS
from pipeline.params import PLACEMENT_KEYS

CODE = ("pipeline", "stm_core")


def imported(path: Path, files: dict[str, Path]) -> set[str]:
    found = set()
    for name in imported_names(path):
        parts = name.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(files)  # packages run too
    return found


def closure(module: str, files: dict[str, Path]) -> set[Path]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported(files[name], files))
    return {files[name] for name in seen}


def only_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def stages():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return [(s.addressing, s.cmd, [d.def_path for d in s.deps], [p for d in s.deps if d.def_path == "params.yaml"
                                                                        for p in (d.params or [])])
                for s in repo.index.stages]


STAGES = stages()


@pytest.mark.parametrize("name, cmd, deps, params", STAGES, ids=[s[0] for s in STAGES])
def test_stage_depends_on_exactly_the_code_it_imports(name, cmd, deps, params):
    words = cmd.split()
    assert words[0] == "stm" and words[1] in COMMANDS, f"{name}: `{cmd}` is not an `stm` command"
    files = module_files(*CODE)
    code = {p for p in closure(COMMANDS[words[1]], files) if not (p.name == "__init__.py" and only_docstring(p))}
    code_deps = [ROOT / d for d in deps if d.split("/")[0] in CODE]
    covered = lambda path, dep: path == dep or dep in path.parents  # noqa: E731
    uncovered = sorted(str(p.relative_to(ROOT)) for p in code if not any(covered(p, d) for d in code_deps))
    unused = sorted(str(d.relative_to(ROOT)) for d in code_deps if not any(covered(p, d) for p in code))
    assert not uncovered, f"dvc.yaml stage {name} runs {uncovered} but does not depend on it"
    assert not unused, f"dvc.yaml stage {name} depends on {unused}, which it never imports"


@pytest.mark.parametrize("name, cmd, deps, params", STAGES, ids=[s[0] for s in STAGES])
def test_no_stage_depends_on_a_placement_key(name, cmd, deps, params):
    placed = sorted(p for p in params for key in PLACEMENT_KEYS if key == p or key.startswith(p + "."))
    assert not placed, f"dvc.yaml stage {name}: params {placed} include placement keys (pipeline.params.PLACEMENT_KEYS)"


def test_every_placement_key_exists_in_params_files():
    from pipeline.params import load_params

    for name in ("params.yaml", "params-paper.yaml"):
        params = load_params(ROOT / name)  # an overlay: merged over its base
        for key in PLACEMENT_KEYS:
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: placement key {key} does not exist"
                node = node[part]
