"""A real Ray cluster on 127.0.0.1: job submission, shared storage, one MLflow server, `init_ray`.

The head is started with `ray start --head --block` in its own temp dir and ports, so it never
meets another Ray on this machine (nor `ray.init()` calls elsewhere: the cluster's address file
lives in that temp dir). The job runs the real `stm evaluate` stage from an uploaded working dir
(the project's packages only): its inputs (a tiny built-in benchmark, a random-init checkpoint,
the params) and outputs live in a directory that stands in for shared storage, its Ray tasks run
on the cluster, and it logs to an MLflow server started by infra/mlflow/start-server.sh.
`bash infra/run-pipeline.sh` as a job (killed, then re-submitted): tests/test_cluster_resume.py.
Teardown stops every process of the cluster and the server by its own process id.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import loopback as lb  # noqa: E402 - after the skip

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CLUSTER_CPUS = 2


@dataclass
class MlflowServer:
    url: str
    proc: subprocess.Popen
    log: Path

    def wait_ready(self, timeout: float = 90) -> str:
        lb.wait_http(f"{self.url}/health", timeout, self.proc, self.log)
        return self.url


@pytest.fixture(scope="module")
def workdir():
    # A short path: Ray's unix sockets live under the temp dir (108-byte limit).
    path = tempfile.mkdtemp(prefix="stmray-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(workdir):
    """infra/mlflow/start-server.sh on every address of this host, as on a cluster's head, with a
    sqlite store (every option the script can pass, so an option this MLflow lacks fails here);
    started before the cluster so both warm up together. Tests call wait_ready()."""
    port = lb.free_port()
    env = lb.clean_env(MLFLOW_DATA_DIR=str(workdir / "mlflow"), MLFLOW_HOST="0.0.0.0", MLFLOW_PORT=str(port),
                       MLFLOW_WORKERS="1", MLFLOW_ALLOWED_HOSTS=lb.mlflow_allowed_hosts(), MLFLOW_AUTH="none")
    procs = lb.Processes(marker=str(workdir / "mlflow"))
    log = workdir / "mlflow-server.log"
    proc = procs.start(["bash", str(REPO / "infra" / "mlflow" / "start-server.sh")], log, env)
    try:
        yield MlflowServer(f"http://127.0.0.1:{port}", proc, log)
    finally:
        procs.stop()
        assert not procs.leftovers(), f"mlflow server processes still running: {procs.leftovers()}"


@pytest.fixture(scope="module")
def ray_head(workdir, mlflow_server):
    procs = lb.Processes(marker=str(workdir / "ray"))
    try:
        yield lb.start_head(procs, workdir / "ray", workdir / "ray-start.log", CLUSTER_CPUS, 300_000_000)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        procs.stop()
        assert not procs.leftovers(), f"Ray processes still running after teardown: {procs.leftovers()}"


def job_working_dir(root: Path) -> Path:
    """What `--working-dir` uploads: the project's packages, no data, no models, no params."""
    root.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("stm_core", "pipeline"):
        shutil.copytree(REPO / package, root / package, ignore=ignore)
    return root


def shared_storage(root: Path) -> Path:
    """Stands in for s3://...: the stage's inputs (a tiny built-in benchmark, a random-init STM
    checkpoint) and its params, at paths every node can reach; the stage writes its outputs here."""
    import torch
    import yaml

    from stm_core.data import BuiltinVideosConfig, write_builtin_videos
    from stm_core.model.checkpoint import save_checkpoint
    from stm_core.model.network import ModelConfig, STMNetwork

    bench = root / "data" / "raw" / "builtin-videos"
    write_builtin_videos(bench, BuiltinVideosConfig(height=64, width=64, frames=4, train_sequences=1,
                                                    val_sequences=2, max_objects=2), seed=0)
    torch.manual_seed(0)
    save_checkpoint(root / "models" / "main" / "model.pt", STMNetwork(ModelConfig(kind="stm", decoder_dim=32, norm="frozen_bn")))
    params = {
        "evaluate": {"variants": ["copy-first", "stm:first"], "dataset": str(bench), "split": "val",
                     "stm_model": str(root / "models" / "main" / "model.pt"), "num_cpus": 1, "overlays": 1},
        "memory": {"every": 2},
        "mlflow": {"experiment": "stm-cluster-test"},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_ray_job_submit_runs_stm_evaluate_on_the_cluster(ray_head, mlflow_server, workdir):
    """The real evaluate stage as a Ray job: its tasks run on the cluster (RAY_ADDRESS from the job),
    its inputs and outputs live in shared storage, its runs land in the one MLflow server."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    t0 = time.monotonic()
    job_dir = job_working_dir(workdir / "job")
    shared = shared_storage(workdir / "shared")
    t1 = time.monotonic()
    tracking = mlflow_server.wait_ready()  # it started beside the cluster; the stage logs from its first line
    t2 = time.monotonic()
    submission_id = f"stm-cluster-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": tracking, "PYTHONUNBUFFERED": "1"}}
    entrypoint = [sys.executable, "-m", "pipeline.cli", "evaluate", "--params", str(shared / "params.yaml"),
                  "--results", str(shared / "results"), "--metrics", str(shared / "metrics" / "evaluate.json"),
                  "--plots", str(shared / "plots")]
    started = time.monotonic()
    result = subprocess.run(
        [lb.RAY_CLI, "job", "submit", "--address", ray_head.dashboard_url, "--submission-id", submission_id,
         "--working-dir", str(job_dir), "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint],
        env=lb.clean_env(), capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"ray job submit failed ({elapsed:.0f} s):\n{output[-5000:]}"

    client = JobSubmissionClient(ray_head.dashboard_url)
    assert client.get_job_status(submission_id) == JobStatus.SUCCEEDED, output[-5000:]
    logs = client.get_job_logs(submission_id)
    # The stage joined the job's cluster (RAY_ADDRESS) instead of starting a Ray of its own.
    assert "Connecting to existing Ray cluster" in logs, logs[-3000:]

    metrics = json.loads((shared / "metrics" / "evaluate.json").read_text())
    assert list(metrics) == ["copy-first", "stm-first"]
    for variant in metrics:
        for seq in ("val-000", "val-001"):
            pngs = sorted((shared / "results" / variant / seq).glob("*.png"))
            assert [p.name for p in pngs] == [f"{t:05d}.png" for t in range(4)], (variant, seq)
    evaluation = json.loads((shared / "results" / "evaluation.json").read_text())
    # the loopback address the job was given is never handed on: the driver node's address is
    assert evaluation["tracking_uri"] == tracking.replace("127.0.0.1", lb.node_address())

    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=tracking)
    parent = mlflow.get_run(evaluation["parent_run_id"])
    assert parent.info.status == "FINISHED"
    for name, run_id in evaluation["children"].items():
        child = mlflow.get_run(run_id)
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "sequences.csv" in [a.path for a in mlflow.list_artifacts(run_id)], name  # via the server's proxy
    print(f"\nray job submit (stm evaluate, 2 variants x 2 sequences) -> SUCCEEDED in {elapsed:.1f} s "
          f"(inputs {t1 - t0:.1f} s, waited {t2 - t1:.1f} s for MLflow)")


def test_init_ray_joins_the_cluster_from_ray_address(ray_head, monkeypatch):
    from pipeline.cluster import init_ray, on_driver_node, shutdown_ray

    monkeypatch.setenv("RAY_ADDRESS", ray_head.gcs_address)
    for key, value in lb.RAY_ENV.items():
        monkeypatch.setenv(key, value)
    if ray.is_initialized():  # init_ray is a no-op on a live session: start from none
        ray.shutdown()
    try:
        # Local-only settings must be dropped when joining (ray.init would refuse them).
        init_ray(num_cpus=1, object_store_memory=50_000_000)
        assert ray.cluster_resources()["CPU"] == CLUSTER_CPUS
        # Same GCS (Ray reports 127.0.0.1 under the machine's own address).
        assert ray.get_runtime_context().gcs_address.rsplit(":", 1)[1] == ray_head.gcs_address.rsplit(":", 1)[1]

        @ray.remote(num_cpus=1)
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert ray.get(where.remote()) in node_ids
        driver_node = ray.get_runtime_context().get_node_id()
        assert ray.get(where.options(**on_driver_node()).remote()) == driver_node
        assert init_ray() is not None  # a second call is a no-op, not a second connection
    finally:
        shutdown_ray()
    assert not ray.is_initialized()
