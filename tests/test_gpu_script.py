"""benchmarks/gpu.sh as it runs on a GPU machine that has torch but not Ray, MLflow or DVC, and only
the repository (no ../shared): here on the CPU, where the CUDA-only parts say "no CUDA"."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("ray", "mlflow", "dvc")
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_checks  # noqa: E402 - benchmarks/gpu_checks.py
import gpu_parts  # noqa: E402


def repository_copy(dest: Path) -> Path:
    """The repository's files (tracked and untracked, not ignored) alone, where no ../shared is beside them."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def blocker(dest: Path) -> Path:
    """A path entry whose ray, mlflow and dvc packages raise ImportError when imported."""
    for name in BLOCKED:
        (dest / name).mkdir(parents=True)
        (dest / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on this machine')\n")
    return dest


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu.sh would run the GPU plan")
def test_gpu_script_runs_with_torch_alone_and_without_the_shared_fixtures(tmp_path):
    repo = repository_copy(tmp_path / "repo")
    assert not (repo / ".." / "shared").exists()
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(blocker(tmp_path / "blocked"))}
    check = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "ray is not installed" in check.stderr  # the blocker works
    out = tmp_path / "out" / "gpu.json"
    proc = subprocess.run([str(repo / "benchmarks" / "gpu.sh"), "--out", str(out), "--quick"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]  # 2: nothing failed, no CUDA
    result = json.loads(out.read_text())
    parts = {p["name"]: p for p in result["parts"]}
    assert list(parts) == ["fixture", "parity", "bf16", "inference", "read", "training"]
    assert result["device"].startswith("cpu")
    assert parts["fixture"]["status"] == "absent" and "no official fixture" in parts["fixture"]["why"]
    for name in ("parity", "bf16"):
        assert parts[name]["status"] == "no CUDA"
    for name in ("inference", "read", "training"):  # every CPU-capable part ran
        assert parts[name]["status"] == "ok", parts[name]
        assert f"[gpu] {name}: ok in " in proc.stdout  # each part's time is printed
    inference = parts["inference"]["result"]["rows"]
    assert {r["memory"] for r in inference} == {"every:5", "recurrent:5:C"} and all(r["fps"] > 0 for r in inference)
    (read,) = parts["read"]["result"]["rows"]
    assert read["kernel"] == "MATH" and read["read_ms"] > 0 and read["sdpa_ms"] > 0
    (train,) = parts["training"]["result"]["rows"]
    assert train["fp32_math"] == "ieee" and train["ms_per_step"] > 0
    table = out.with_suffix(".md").read_text()
    assert "Device: cpu" in table and "| parity | no CUDA |" in table and table.strip() in proc.stdout


def test_a_failing_part_is_a_row_saying_why_and_the_exit_code_says_so(tmp_path, monkeypatch):
    def broken(device: str, plan: dict) -> dict:
        raise RuntimeError("this part broke")

    for name in ("inference", "read", "training"):
        monkeypatch.setattr(gpu_parts, name, broken)
    for name in ("cuda_against_cpu", "bf16_agreement"):  # where CUDA is present: broken too, not run for real
        monkeypatch.setattr(gpu_parts, name, lambda plan: broken("cuda", plan))
    out = tmp_path / "gpu.json"
    missing = tmp_path / "no-fixture"
    code = gpu_checks.main(["--out", str(out), "--official", str(missing)])
    assert code == 1
    parts = {p["name"]: p for p in json.loads(out.read_text())["parts"]}
    assert parts["fixture"]["status"] == "failed" and str(missing) in parts["fixture"]["why"]  # named, absent
    for name in ("inference", "read", "training"):
        assert parts[name] == {"name": name, "status": "failed", "why": "RuntimeError: this part broke",
                               "seconds": parts[name]["seconds"]}
    assert "| training | failed |" in out.with_suffix(".md").read_text()


def test_a_part_that_misses_its_bar_fails_and_the_plan_stops_starting_parts(monkeypatch):
    plan = {"seconds": 0}
    row = gpu_checks.run_part("parity", lambda: {"passed": False}, started=0.0, plan={"seconds": 1e12})
    assert row["status"] == "failed" and row["why"] == "missed its bar"
    assert gpu_checks.run_part("read", lambda: {}, started=-1.0, plan=plan)["status"] == "not run"
    assert gpu_checks.exit_code({"parts": [{"status": "ok"}, {"status": "absent"}]}) == 0
    assert gpu_checks.exit_code({"parts": [{"status": "ok"}, {"status": "no CUDA"}]}) == 2
    assert gpu_checks.exit_code({"parts": [{"status": "not run"}, {"status": "no CUDA"}]}) == 1
