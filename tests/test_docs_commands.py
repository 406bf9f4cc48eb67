"""Every command the pages show is one the code takes: each `stm ...`, `python -m ...` and
`benchmarks/...` line in a code block of README.md, docs/, infra/README.md, benchmarks/README.md
and CONTRIBUTING.md is parsed by its real argument parser, so a renamed or removed flag fails here.

Pages may use placeholders (CKPT, DIR, s3://bucket/...) where a value goes: the parsers take them
as strings, and a flag or subcommand that does not exist is still an error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "CONTRIBUTING.md", "infra/README.md", "benchmarks/README.md",
         *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
PYTHON = re.compile(r"^(\S*/)?python3?$")


def shell_lines(page: str) -> list[str]:
    """Commands of the page's bash/sh code blocks: continued lines joined, comments and prompts dropped,
    `a && b`, `a; b` and `a | b` split."""
    text = (REPO / page).read_text()
    out = []
    for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip().removeprefix("$ ")
            out += [part.strip() for part in re.split(r"&&|\|\||;|\|", line) if part.strip()]
    return out


def command_of(line: str) -> list[str] | None:
    """The argv of a project command on this line (after `ray job submit ... --`, env assignments,
    `time`, `nice`), or None when the line runs something else."""
    try:
        argv = shlex.split(line)
    except ValueError:
        return None
    for _ in range(2):  # `A=1 ray job submit ... -- B=2 stm ...`
        while argv and (ENV_ASSIGNMENT.match(argv[0]) or argv[0] in ("time", "nice", "exec", "env")):
            argv = argv[1:]
        if "--" in argv and argv[:1] in (["ray"], ["uv"]):
            argv = argv[argv.index("--") + 1:]
    if not argv:
        return None
    if argv[0] == "stm":
        return argv
    if PYTHON.match(argv[0]) and len(argv) > 1:
        if argv[1] == "-m" and len(argv) > 2 and argv[2].split(".")[0] in ("stm_core", "pipeline", "benchmarks"):
            return argv[1:]
        if argv[1].startswith("benchmarks/") or argv[1].startswith("docs/"):
            return argv[1:]
    if argv[0].startswith(("benchmarks/", "./benchmarks/")) and argv[0].endswith((".py", ".sh")):
        return argv
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    return [(page, argv) for page in PAGES for line in shell_lines(page) if (argv := command_of(line))]


class Parsed(Exception):
    """Raised in place of returning from parse_args: the arguments parsed, and nothing runs."""


@contextlib.contextmanager
def parse_only():
    original, original_init = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.__init__

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    def exact_flags(self, *args, **kwargs):  # a page's `--overlay` must not pass as `--overlay-x`
        original_init(self, *args, **{**kwargs, "allow_abbrev": False})

    argparse.ArgumentParser.parse_args = parse_then_stop  # type: ignore[method-assign]
    argparse.ArgumentParser.__init__ = exact_flags  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
        argparse.ArgumentParser.__init__ = original_init  # type: ignore[method-assign]


def check_parses(argv: list[str]) -> str | None:
    """None when the script's own parser takes argv; else what it said."""
    if argv[0] == "stm":
        from pipeline.cli import COMMANDS, build_parser

        if len(argv) < 2 or argv[1] not in COMMANDS:
            return f"no stm command {argv[1:2]}"
        target, run_args = None, argv[1:]
    elif argv[0] == "-m":
        target, run_args = argv[1], argv[2:]
    else:
        path = REPO / argv[0].removeprefix("./")
        if not path.is_file():
            return f"{argv[0]} does not exist"
        if path.suffix != ".py":
            return None  # a shell script: its existence is what can be checked here
        target, run_args = str(path), argv[1:]
    stderr, saved_argv = io.StringIO(), sys.argv
    try:
        with parse_only(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            if target is None:
                build_parser(only=run_args[0]).parse_args(run_args)
            else:
                sys.argv = [target, *run_args]
                if target.endswith(".py"):
                    sys.path.insert(0, str(Path(target).parent))  # as `python script.py` puts it first
                    try:
                        runpy.run_path(target, run_name="__main__")
                    finally:
                        sys.path.remove(str(Path(target).parent))
                else:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
    except Parsed:
        return None
    except SystemExit as stop:
        if stop.code in (0, None) and ("-h" in run_args or "--help" in run_args):
            return None
        return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else f"exit {stop.code}"
    finally:
        sys.argv = saved_argv
    return "ran to the end without parsing its arguments with argparse"


def test_the_pages_show_commands():
    pages = {page for page, _ in documented_commands()}
    assert {"README.md", "docs/segment.md", "benchmarks/README.md"} <= pages, pages


@pytest.mark.parametrize(("page", "argv"), documented_commands(), ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_documented_command_parses(page, argv, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    problem = check_parses(argv)
    assert problem is None, f"{page}: `{shlex.join(argv)}`: {problem}"


def test_a_removed_flag_fails():
    """The check can fail: a flag no parser has is refused, and so is a subcommand."""
    assert check_parses(["stm", "segment", "--no-such-flag", "x"]) is not None
    assert check_parses(["stm", "no-such-command"]) is not None
    assert check_parses(["benchmarks/no_such_script.py"]) is not None


def test_every_relative_link_resolves_in_a_fresh_clone():
    """Links point at files git holds: a DVC output (results/, models/) is not in a fresh clone."""
    import subprocess

    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0 or not listed.stdout:
        pytest.skip("not a git checkout")
    tracked = set(listed.stdout.split())
    folders = {str(Path(f).parent) for f in tracked} | {str(p) for f in tracked for p in Path(f).parents}
    broken = []
    for page in [*PAGES, "reports/ablation.md"]:
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (REPO / page).read_text()):
            if link.startswith(("http://", "https://", "mailto:")):
                continue
            target = (REPO / page).parent / link
            rel = str(target.resolve().relative_to(REPO.resolve())) if target.resolve().is_relative_to(REPO.resolve()) else None
            if rel is None or (rel not in tracked and rel not in folders):
                broken.append(f"{page}: {link}")
    assert not broken, "links to files a fresh clone lacks:\n" + "\n".join(broken)
