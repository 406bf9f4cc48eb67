"""Stopping and single-writer runs: checkpoints load weights-only, the run lock (local path and store
URI), and (slow) SIGINT stops `stm train` within 10 s, in-process and with 2 Ray Train workers, with
its MLflow run (real sqlite store) ended as KILLED, while a second run of the same stage is refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import TINY_MODEL, make_project, write_params
from training_configs import loop_config, stage_params

from pipeline.runguard import RunLock, RunLocked
from pipeline.train.checkpoints import rng_state, write_state
from stm_core.model.network import ModelConfig, STMNetwork


def test_training_state_loads_weights_only(tmp_path):
    """What a training checkpoint holds (model, Adam, scaler, RNG of every rank, totals with a
    plateau state and the curve) is tensors, numbers and strings: weights_only=True reads it."""
    network = STMNetwork(ModelConfig(**TINY_MODEL))
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    for p in network.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # Adam's per-parameter state exists
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    rngs = [rng_state(np.random.default_rng([0, r])) for r in range(2)]
    totals = {"clips": 8, "seconds": 1.5, "loss": 0.5, "restarts": 0, "resumed_from": 0, "curve": [[1, 0.7], [2, 0.5]],
              "plateau": {"best": float("inf"), "bad": 0, "scale": 1.0}}
    config = loop_config(stage="pretrain", per_worker_batch=2, train=stage_params(num_to_keep=2))
    write_state(str(tmp_path), network, optimizer, scaler, 2, rngs, totals, config, 2)
    state = torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 2 and state["totals"]["curve"] == [[1, 0.7], [2, 0.5]]
    assert len(state["rng"]) == 2 and state["optimizer"]["state"]
    network.load_state_dict(state["model"])


def test_run_lock_on_a_path_refuses_a_second_holder_and_takes_over_a_stale_one(tmp_path):
    first = RunLock(str(tmp_path), "pretrain-abc", "train --stage pretrain").acquire()
    with pytest.raises(RunLocked, match=rf"process {os.getpid()} on {socket.gethostname()}"):
        RunLock(str(tmp_path), "pretrain-abc", "train --stage pretrain").acquire()
    with RunLock(str(tmp_path), "main-abc", "train --stage main"):  # another run: its own lock
        pass
    first.release()
    assert not (tmp_path / "pretrain-abc.lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "pretrain-abc.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with RunLock(str(tmp_path), "pretrain-abc", "train --stage pretrain") as lock:  # its holder is gone
        assert json.loads((tmp_path / "pretrain-abc.lock").read_text())["token"] == lock.token


def test_run_lock_in_an_s3_store(tmp_path, monkeypatch):
    """The same on a store URI (a real S3 API: moto's server on loopback)."""
    moto = pytest.importorskip("moto.server")
    import boto3

    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="locks")
        store = "s3://locks/checkpoints"
        with RunLock(store, "main-1", "train --stage main"):
            with pytest.raises(RunLocked, match=f"process {os.getpid()}"):
                RunLock(store, "main-1", "train --stage main").acquire()
        with RunLock(store, "main-1", "train --stage main"):  # released: free again
            pass
    finally:
        server.stop()


# ----------------------------------------------------------------------------- slow: real stages
def start_train(project: Path, params: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--stage", "pretrain", "--params", str(params)]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"never saw {text!r} (exit {proc.poll()}):\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.3)


def stop_and_check(project: Path, params: Path, workers: int) -> None:
    from mlflow import MlflowClient

    log = project / "first.log"
    first = start_train(project, params, log)
    try:
        wait_for_line(first, log, "[train] step 3/", 300)  # past the checkpoint at step 2
        second = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--stage", "pretrain", "--params",
                                 str(params)], cwd=project, capture_output=True, text=True, timeout=120,
                                env={k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DVC_ROOT")})
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"in use by process {first.pid} on {socket.gethostname()}" in second.stderr, second.stderr[-2000:]
        t0 = time.monotonic()
        first.send_signal(signal.SIGINT)
        code = first.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    text = log.read_text(errors="replace")
    assert took < 10, f"stopped after {took:.1f} s:\n{text[-3000:]}"
    assert code == 130, text[-3000:]
    client = MlflowClient(f"sqlite:///{project.resolve()}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("test-train").experiment_id])
    assert run.info.status == "KILLED", text[-3000:]
    assert not (project / "models/pretrain/model.pt").exists()  # nothing exported from a stopped run
    checkpoints = list((project / "checkpoints").rglob("checkpoint_*/state.pt"))
    assert checkpoints, text[-3000:]  # the last checkpoint stays for a resume
    assert not list((project / "checkpoints").glob("*.lock")), "the stopped run left its lock"
    assert not first_leftovers(project), "processes of the stopped run still alive"


def first_leftovers(project: Path) -> list[int]:
    """Processes whose command line or working directory is the test project (its Ray workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if os.readlink(entry / "cwd").startswith(str(project)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigint_stops_in_process_training_and_kills_its_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    make_project(tmp_path)
    params = write_params(tmp_path, ray={"num_workers": 0},
                          pretrain={"steps": 400, "checkpoint_every": 2, "log_every": 1, "log_images_every": 0})
    stop_and_check(tmp_path, params, workers=0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigint_stops_training_on_two_ray_train_workers(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    make_project(tmp_path)
    params = write_params(tmp_path, ray={"num_workers": 2, "cpus_per_worker": 0.5, "num_cpus": 2},
                          pretrain={"steps": 400, "checkpoint_every": 2, "log_every": 1, "log_images_every": 0,
                                    "materialize": True})
    stop_and_check(tmp_path, params, workers=2)
