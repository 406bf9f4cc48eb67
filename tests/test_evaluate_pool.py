"""`stm evaluate` on its actor pool: a failed item keeps every finished one and a re-run evaluates only
the rest (real local Ray, real MLflow store); on a cluster whose only node has no CPUs, the stage
waits, says what for, and finishes once a worker node joins (a real `ray start` head and node on
loopback, stopped by process id)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

import loopback as lb  # noqa: E402 - after the skip
from test_evaluate import make_tiny_davis  # noqa: E402

pytestmark = pytest.mark.slow


def write_inputs(root: Path, variants: list[str]) -> dict:
    """A tiny DAVIS benchmark and a random-init STM checkpoint; -> the params."""
    import torch

    from stm_core.model.checkpoint import save_checkpoint
    from stm_core.model.network import ModelConfig, STMNetwork

    make_tiny_davis(root / "bench", frames=4, size=48, extra=1)
    torch.manual_seed(0)
    save_checkpoint(root / "stm.pt", STMNetwork(ModelConfig(kind="stm", decoder_dim=16, norm="frozen_bn")))
    return {"evaluate": {"variants": variants, "dataset": str(root / "bench"), "split": "val",
                         "stm_model": str(root / "stm.pt"), "num_cpus": 1, "overlays": 0, "probe_sequences": 1},
            "memory": {"every": 2}, "mlflow": {"experiment": "test-eval-pool"}}


def evaluate_here(tmp_path: Path, monkeypatch, capsys) -> tuple[int, str]:
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code = main(["evaluate", "--params", "params.yaml"])
    finally:
        ray.shutdown()
    return code, capsys.readouterr().err


def scores(path: Path) -> dict:
    """metrics/evaluate.json without the timings (which differ run to run)."""
    metrics = json.loads(path.read_text())
    return {v: {k: x for k, x in m.items() if k not in ("fps", "peak_memory_mb")} for v, m in metrics.items()}


def test_a_failed_item_keeps_the_finished_ones_and_a_rerun_does_only_the_rest(tmp_path, monkeypatch, capsys):
    params = write_inputs(tmp_path, ["copy-first", "stm:first", "stm:every"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    broken = tmp_path / "bench" / "JPEGImages" / "480p" / "seq-0" / "00002.jpg"
    good = broken.read_bytes()
    broken.write_bytes(b"not a jpeg")  # the network variants of seq-0 fail on it (copy-first reads no frame)

    code, err = evaluate_here(tmp_path, monkeypatch, capsys)
    assert code == 2
    records = tmp_path / "results.partial"
    kept = sorted(records.glob("*/result.json"))
    assert "of 10 items failed" in err and "seq-0" in err and "a re-run evaluates only the rest" in err, err
    # 3 variants x 3 sequences + 1 probe = 10 items; stm-first and stm-every-2 of seq-0 failed, 8 are kept.
    assert "2 of 10 items failed" in err and len(kept) == 8, err
    assert not (tmp_path / "metrics" / "evaluate.json").exists()  # nothing half-done passes as complete

    broken.write_bytes(good)
    code, err = evaluate_here(tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert "8 of 10 items finished in an earlier run" in err and "evaluating the other 2" in err, err
    assert not records.exists()  # cleared once everything is in results/
    resumed = scores(tmp_path / "metrics" / "evaluate.json")
    for variant in ("copy-first", "stm-first", "stm-every-2"):
        assert sorted(p.name for p in (tmp_path / "results" / variant).iterdir()) == \
            ["seq-0", "seq-a", "seq-b", "sequences.csv"]

    shutil.rmtree(tmp_path / "results")  # a fresh run from nothing gives the same scores
    code, err = evaluate_here(tmp_path, monkeypatch, capsys)
    assert code == 0 and "earlier run" not in err, err
    assert scores(tmp_path / "metrics" / "evaluate.json") == resumed


def test_evaluation_waits_for_a_worker_node_and_finishes_when_one_joins(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="stmwait-", dir="/tmp"))  # short: Ray's socket paths
    procs = lb.Processes(marker=str(base))
    try:
        # A run against a cluster logs to a server every node reaches (a local store is refused there).
        tracking, server = lb.start_mlflow(procs, base, lb.clean_env(), str(base / "mlartifacts"))
        head = lb.start_head(procs, base / "head", base / "head.log", cpus=0)
        params = write_inputs(tmp_path, ["copy-first", "stm:first"])
        params["ray"] = {"wait_for_nodes_s": 240}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        log = tmp_path / "evaluate.log"
        lb.wait_mlflow(tracking, server, base)
        env = lb.clean_env(RAY_ADDRESS=head.gcs_address, MLFLOW_TRACKING_URI=tracking)
        stage = procs.start([sys.executable, "-m", "pipeline.cli", "evaluate", "--params", "params.yaml"], log, env,
                            cwd=tmp_path)
        lb.wait_for(lambda: "waiting for resources" in lb.tail(log) or stage.poll() is not None, 180,
                    "evaluate never said it waits", lambda: lb.tail(log))
        assert stage.poll() is None, lb.tail(log)
        assert "each actor needs {'CPU': 1" in lb.tail(log)
        time.sleep(2)  # still waiting, not failed
        assert stage.poll() is None, lb.tail(log)
        procs.start([lb.RAY_CLI, "start", "--block", "--address", head.gcs_address, "--node-ip-address", "127.0.0.1",
                     "--num-cpus", "2", "--num-gpus", "0", *lb.agent_ports()], base / "worker.log", lb.clean_env())
        assert stage.wait(timeout=300) == 0, lb.tail(log)
        metrics = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
        assert set(metrics) == {"copy-first", "stm-first"}
        nodes = json.loads((tmp_path / "results" / "evaluation.json").read_text())["nodes"]
        assert len(nodes) == 1  # the worker node: the head holds no CPU
    finally:
        procs.stop()
        leftovers = procs.leftovers()
        shutil.rmtree(base, ignore_errors=True)
    assert not leftovers, f"processes still running: {leftovers}"
