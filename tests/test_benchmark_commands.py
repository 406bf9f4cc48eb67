"""Every command benchmarks/README.md shows is parsed by its script's real argument parser, so a
flag the script no longer takes fails here (the command is parsed, not run)."""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "benchmarks" / "README.md"
PYTHONS = ("python", "python3", ".venv/bin/python")
SCRIPTS = {"benchmarks/gpu.sh": "benchmarks/gpu_checks.py"}  # a shell wrapper -> the parser it hands over to


def commands() -> list[str]:
    """Lines of fenced blocks and inline code spans that run a Python benchmark or gpu.sh."""
    text = README.read_text()
    fenced = [line for block in re.findall(r"```\n(.*?)```", text, re.S) for line in block.splitlines()]
    inline = [" ".join(span.split()) for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))]
    found = []
    for line in fenced + inline:
        words = shlex.split(line.split("#")[0]) if line.strip() else []
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # OMP_NUM_THREADS=1 ...
            words = words[1:]
        if words and (words[0] in PYTHONS and len(words) > 1 or words[0] in SCRIPTS) and "..." not in words:
            found.append(" ".join(words))
    return found


class Parsed(Exception):
    pass


def target(words: list[str]) -> tuple[str, str, list[str]]:
    if words[0] in SCRIPTS:
        return "path", SCRIPTS[words[0]], words[1:]
    if words[1] == "-m":
        return "module", words[2], words[3:]
    return "path", words[1], words[2:]


@pytest.mark.parametrize("command", commands())
def test_readme_command_parses(command, monkeypatch):
    words = [w for w in shlex.split(command) if w not in ("[", "]")]
    words = [w.strip("[]") for w in words]  # optional parts written [--flag VALUE]
    kind, what, argv = target(words)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [what, *argv])
    monkeypatch.setattr(sys, "path", [str(REPO / Path(what).parent), *sys.path] if kind == "path" else sys.path)
    with pytest.raises(Parsed):
        if kind == "module":
            runpy.run_module(what, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(REPO / what), run_name="__main__")


def test_the_readme_shows_the_gpu_and_training_commands():
    shown = commands()
    assert any(c.startswith("benchmarks/gpu.sh") for c in shown)
    assert any(" -m stm_core.train_bench " in c for c in shown) and len(shown) >= 15
