"""SIGINT / SIGTERM stop `stm download`, `stm synthesize` and `stm evaluate` (real stages in their
own processes, real Ray and MLflow sqlite stores) within seconds: exit 130 / 143, the MLflow run
ended KILLED, no partial output left. (`stm train`: tests/test_stopping.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_stopping import wait_for_line

STOP_WITHIN_S = 15.0  # a Ray stage shuts its local instance down on the way out


def start(project: Path, log: Path, *argv: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *argv], cwd=project, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen, signum: int, log: Path) -> float:
    """Send `signum`, wait for the exit; -> seconds it took. Asserts the exit code 128 + signum."""
    t0 = time.monotonic()
    proc.send_signal(signum)
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    took = time.monotonic() - t0
    text = log.read_text(errors="replace")
    assert code == 128 + signum, f"exit {code}:\n{text[-3000:]}"
    assert took < STOP_WITHIN_S, f"stopped after {took:.1f} s:\n{text[-3000:]}"
    return took


def only_run(project: Path, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project.resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def wait_for_path(proc: subprocess.Popen, log: Path, pattern: str, where: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not list(where.glob(pattern)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {where / pattern} (exit {proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


@pytest.mark.slow
def test_sigterm_stops_download_and_removes_the_half_built_source(tmp_path):
    (tmp_path / ".git").mkdir()
    videos = {"seed": 0, "style": "hard", "height": 128, "width": 128, "frames": 80, "train_sequences": 40,
              "val_sequences": 3}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"download": {"sources": {"builtin-videos": videos},
                                                                       "root": "data/raw"}}))
    log = tmp_path / "download.log"
    proc = start(tmp_path, log, "download", "--params", "params.yaml", "--source", "builtin-videos")
    wait_for_path(proc, log, ".builtin-videos.partial-*/**/*.png", tmp_path / "data/raw", 120)
    stop(proc, signal.SIGTERM, log)
    assert sorted(p.name for p in (tmp_path / "data/raw").iterdir()) == [], "a partial source was left"


@pytest.mark.slow
def test_sigint_stops_synthesize_with_its_run_killed(tmp_path):
    from stm_core.data.builtin import BuiltinImagesConfig, write_builtin_images

    (tmp_path / ".git").mkdir()
    write_builtin_images(tmp_path / "data/raw/builtin-images", BuiltinImagesConfig(count=12, size=64), 0)
    params = {"synthesize": {"sources": ["builtin-images"], "raw_root": "data/raw", "output": "data/synthetic",
                             "sets": {"stm": {"frames": 3, "clips": 4000}}, "height": 64, "width": 64,
                             "clips_per_shard": 50},
              "ray": {"num_cpus": 2}, "mlflow": {"experiment": "test-stop"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    log = tmp_path / "synthesize.log"
    proc = start(tmp_path, log, "synthesize", "--params", "params.yaml")
    wait_for_line(proc, log, "synthesize: 4000 clips x 3 frames", 180)
    wait_for_path(proc, log, ".stm.tmp-*", tmp_path / "data/synthetic", 60)
    time.sleep(2)  # inside Ray Data's write
    stop(proc, signal.SIGINT, log)
    assert only_run(tmp_path, "test-stop").info.status == "KILLED"
    left = list((tmp_path / "data/synthetic").iterdir()) if (tmp_path / "data/synthetic").exists() else []
    assert left == [], f"partial clip sets left: {left}"


@pytest.mark.slow
def test_sigterm_stops_evaluate_with_its_run_killed(tmp_path):
    import torch
    from test_evaluate import make_tiny_davis

    from stm_core.model.checkpoint import save_checkpoint
    from stm_core.model.network import ModelConfig, STMNetwork

    (tmp_path / ".git").mkdir()
    make_tiny_davis(tmp_path / "bench", frames=40, size=96, extra=6)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "stm.pt", STMNetwork(ModelConfig(kind="stm", decoder_dim=32, norm="frozen_bn")))
    params = {"evaluate": {"variants": ["stm:every", "stm:first"], "dataset": "bench", "split": "val",
                           "stm_model": "stm.pt", "num_cpus": 1, "overlays": 0, "probe_sequences": 0},
              "memory": {"every": 2}, "ray": {"num_cpus": 2}, "mlflow": {"experiment": "test-stop"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    log = tmp_path / "evaluate.log"
    proc = start(tmp_path, log, "evaluate", "--params", "params.yaml")
    wait_for_line(proc, log, "MLflow run", 180)
    time.sleep(3)  # the pool is running items
    stop(proc, signal.SIGTERM, log)
    assert only_run(tmp_path, "test-stop").info.status == "KILLED"
    assert not (tmp_path / "results/.partial").exists()
    assert not (tmp_path / "metrics/evaluate.json").exists()  # nothing of a half evaluation passes for a result
