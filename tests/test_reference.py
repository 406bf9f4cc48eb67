"""docs/reference.md is what docs/make_reference.py writes now, and it documents every param and command."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def make_reference():
    spec = importlib.util.spec_from_file_location("make_reference", ROOT / "docs" / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_reference"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rendered(make_reference) -> str:
    return make_reference.render()


def key_paths(tree: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, dict):
            paths += key_paths(value, path + ".")
    return paths


def test_the_reference_is_up_to_date(rendered: str) -> None:
    on_disk = (ROOT / "docs" / "reference.md").read_text()
    assert on_disk == rendered, "docs/reference.md is out of date: run `python docs/make_reference.py`"


def test_every_params_key_has_a_row_with_its_comment(make_reference, rendered: str) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for path in key_paths(params):
        parts = path.split(".")
        # a key inside a one-line {flow: mapping} is documented on its parent's row
        documented = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        assert any(f"| `{p}` |" in rendered or f"### `{p}`" in rendered for p in documented), path
    for entry in make_reference.params_entries((ROOT / "params.yaml").read_text()):
        if entry.value:  # every key with a value is explained beside it
            assert entry.comment, f"params.yaml: {entry.path} has no comment"


def test_every_command_is_in_the_reference(rendered: str) -> None:
    from pipeline.cli import COMMANDS

    for name in COMMANDS:
        assert f"### `stm {name}`" in rendered and f"usage: stm {name}" in rendered, name


def test_the_parser_follows_nesting_and_keeps_comments(make_reference) -> None:
    text = ("# header\nseed: 0  # global seed\nmemory:\n  every: 5  # every N-th frame\n  nested:  # a group\n"
            "    deep: [1, 2]  # a list | with a bar\nray:\n  num_workers: 0  # ranks\n")
    entries = {e.path: e for e in make_reference.params_entries(text)}
    assert list(entries) == ["seed", "memory", "memory.every", "memory.nested", "memory.nested.deep", "ray",
                             "ray.num_workers"]
    assert entries["memory.nested.deep"].value == "[1, 2]" and entries["memory.nested"].comment == "a group"
    table = "\n".join(make_reference.params_section(list(entries.values())))
    assert "| `memory.nested.deep` | `[1, 2]` | a list \\| with a bar |" in table
