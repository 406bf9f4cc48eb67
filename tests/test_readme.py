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


def test_official_weights_section_uses_real_commands_and_params():
    import shlex

    import yaml

    from pipeline.cli import build_parser

    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Use the official STM weights\s*$(.*?)(?=^## )", text, re.S | re.M).group(1)
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
