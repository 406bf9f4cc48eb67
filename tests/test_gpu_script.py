"""benchmarks/gpu.sh on a machine without a GPU: it runs the CPU checks and names what it skipped."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu.sh would run the GPU checks")
def test_gpu_script_without_cuda_runs_the_cpu_checks_and_says_what_it_skipped(tmp_path):
    out = tmp_path / "gpu.json"
    missing = tmp_path / "no-fixture"  # the fixture check is tests/test_official.py's; here: its skip
    proc = subprocess.run([str(REPO / "benchmarks" / "gpu.sh"), str(out), "--official", str(missing)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    parts = result["parts"]
    assert result["device"].startswith("cpu")
    assert str(missing) in parts["fixture"]["skipped"]
    for name in ("inference", "training"):
        assert "need a GPU" in parts[name]["skipped"] and "no CUDA device" in parts[name]["skipped"]
    assert parts["inference"]["cpu_smoke"]["fps"] > 0 and parts["inference"]["cpu_smoke"]["memory_entries"] >= 1
    assert parts["training"]["cpu_smoke"]["ms_per_step"] > 0
    assert "skipped" in proc.stdout and "Device: cpu" in proc.stdout  # the table says it too
