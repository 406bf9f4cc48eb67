"""`dvc plots show --json` (real DVC, in a fresh git + DVC repository holding this project's
dvc.yaml, params.yaml and committed plot data) draws one series per evaluation variant in the
per-frame plot, and the variants are the ones params.yaml's evaluate.variants and memory give."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PER_FRAME = "plots/evaluate_j_per_frame.csv"


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    dvc_bin = Path(sys.executable).with_name("dvc")
    return subprocess.run([str(dvc_bin), *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=True)


def params_variants() -> list[str]:
    from pipeline.evaluate.settings import EvaluateParams
    from pipeline.evaluate.variants import MemoryParams, parse_variants
    from pipeline.params import load_params, section

    params = load_params(ROOT / "params.yaml")
    memory = section(params, "memory", MemoryParams)
    return [v.name for v in parse_variants(section(params, "evaluate", EvaluateParams).variants, memory)]


def test_per_frame_plot_draws_every_variant(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc("init", "-q", cwd=tmp_path)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "plots", tmp_path / "plots")
    shown = json.loads(dvc("plots", "show", "--json", cwd=tmp_path).stdout)["data"]

    columns = next(csv.reader((ROOT / PER_FRAME).open()))[1:]
    (plot,) = shown[PER_FRAME]
    values = plot["content"]["data"]["values"]
    series = {(row["rev"], row["field"]) for row in values}  # DVC's long form of a `y` list: one `field` per line
    assert sorted(name for _, name in series) == sorted(columns), series
    assert len(series) == len(columns) == len(params_variants()) > 1
    assert columns == params_variants(), "dvc.yaml's per-frame `y` list must follow params.yaml's variants"
    frames = {row["frame"] for row in values}
    assert len(values) == len(frames) * len(columns)  # every variant at every frame
    # the per-step training plots are still one line each
    train = [(name, p) for name, plots in shown.items() if name.startswith("plots/train-") for p in plots]
    assert train and all("field" not in row and "loss" in row for _, p in train for row in p["content"]["data"]["values"])
