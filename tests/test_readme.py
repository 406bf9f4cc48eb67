"""The README's Quick start is how every user and CI begins: two lines, and .ci/run runs the same."""

from __future__ import annotations

import re
from pathlib import Path

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


def test_ci_runs_the_readme_install_and_test_line():
    ci = (REPO / ".ci/run").read_text()
    install_and_run, test = quick_start_lines()
    assert "-c constraints.txt -e \".[dev]\"" in install_and_run and "-c constraints.txt -e \".[dev]\"" in ci
    assert test in ci
