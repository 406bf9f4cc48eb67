"""The README is for users: its Quick start is how every user and CI begins (two lines, and .ci/run runs the
same), it stays short, and its commands and links are real."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def quick_start_lines() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Quick start\s*$(.*?)(?=^## )", text, re.S | re.M).group(1)
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_lines_install_run_then_test():
    install_and_run, test = quick_start_lines()
    assert "pip install -c constraints.txt" in install_and_run and install_and_run.endswith("dvc repro")
    assert "pytest" in test


def test_ci_runs_the_readme_quick_start_lines_in_order():
    """.ci/run reads the two lines from README.md (.ci/quick-start) and runs the first (install and
    `dvc repro`), then the second (the tests): what a user types, in the order they type it."""
    printed = subprocess.run([str(REPO / ".ci/quick-start")], capture_output=True, text=True, check=True)
    assert printed.stdout.splitlines() == quick_start_lines()
    ci = (REPO / ".ci/run").read_text()
    assert "mapfile -t quick_start < <(.ci/quick-start)" in ci
    first, second = ci.index('"${quick_start[0]}"'), ci.index('"${quick_start[1]}"')
    assert first < second, ".ci/run must run the install and pipeline line before the test line"


def test_official_weights_section_uses_real_commands_and_params():
    import shlex

    import yaml

    from pipeline.cli import build_parser

    text = (REPO / "docs" / "official-weights.md").read_text()
    section = re.search(r"^## Commands\s*$(.*?)(?=^## )", text, re.S | re.M).group(1)
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    lines = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    stm_lines = [shlex.split(line)[1:] for line in lines if line.startswith("stm ")]
    assert stm_lines[0][0] == "import-official"
    for argv in stm_lines:  # each parses with the real `stm` parser
        build_parser(only=argv[0]).parse_args(argv)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    [exp] = [line for line in lines if line.startswith("dvc exp run")]
    for assignment in re.findall(r"-S '?([\w.]+)=", exp):
        section_name, key = assignment.split(".")
        assert key in params[section_name], assignment


def test_readme_is_short_and_links_only_pages_that_exist():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert "docs/reference.md" in links and "LICENSE" in links
    for link in links:
        if not link.startswith("http"):
            assert (REPO / link).exists(), f"README links {link}, which does not exist"


def test_readme_everyday_commands_parse_with_the_real_parser():
    import shlex

    from pipeline.cli import COMMANDS, build_parser

    text = (REPO / "README.md").read_text()
    lines = [line.split("  #")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.replace("\\\n", " ").splitlines()]  # continued lines joined
    lines = [line.split(" -- ", 1)[1] if " -- stm " in line else line for line in lines]  # ray job submit ... --
    stm_lines = [shlex.split(line)[1:] for line in lines if line.startswith("stm ")]
    assert len(stm_lines) >= 5
    for argv in stm_lines:
        assert argv[0] in COMMANDS, argv
        build_parser(only=argv[0]).parse_args(argv)


def test_docs_link_only_pages_that_exist():
    for page in sorted((REPO / "docs").glob("*.md")):
        for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not link.startswith(("http", "mailto:")):
                assert (page.parent / link).exists(), f"{page.name} links {link}, which does not exist"


def committed(path: str) -> str:
    """A file as the last commit holds it: `dvc repro` rewrites metrics/ with this machine's digits
    (training numerics differ across CPU models), and the pages describe the committed baseline."""
    shown = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True, text=True)
    if shown.returncode != 0:
        pytest.skip(f"not a git checkout with {path} committed: {shown.stderr.strip()}")
    return shown.stdout


def test_results_page_shows_the_committed_baseline():
    import json

    summary = json.loads(committed("metrics/summary.json"))["JF"]
    text = (REPO / "docs" / "results.md").read_text()
    shown = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| [^|]+ \| `([\w-]+)` \| ([\d.]+) \|", text, re.M)}
    assert set(shown) == set(summary), "docs/results.md: variants differ from the committed metrics/summary.json"
    for variant, jf in summary.items():
        assert shown[variant] == jf, f"docs/results.md: {variant} J&F {shown[variant]}, committed metrics/summary.json {jf}"
