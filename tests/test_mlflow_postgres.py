"""The tracking server as infra/ runs it: a real PostgreSQL server (Debian's, infra/ci-postgres.sh)
as MLflow's backend store, `infra/mlflow/start-server.sh` with basic-auth and the admin password
from the environment (a secret), and `stm evaluate` submitted as a Ray job to a two-node cluster
whose nodes have the MLflow user only in their environment (as pods from the Secret): its runs land
in PostgreSQL, the evaluation ran on both nodes, and a request without credentials is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import loopback as lb
import pytest
import torch
import yaml
from test_evaluate import make_tiny_davis
from test_multinode import project_copy

REPO = Path(__file__).resolve().parents[1]
ADMIN, PASSWORD = "admin", "s3cret-admin-pw"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0 or shutil.which("unshare") is None,
                       reason="needs root (PostgreSQL runs as user postgres) and unshare(1) for the second node"),
]


def postgres_bin() -> Path:
    done = subprocess.run(["bash", str(REPO / "infra/ci-postgres.sh")], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"no PostgreSQL server programs: {done.stderr.strip()}")
    return Path(done.stdout.strip().splitlines()[-1])


def as_postgres(*args: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args]


def start_postgres(base: Path) -> tuple[str, Path]:
    """-> (the backend URI, the data dir). Trust on loopback only; a fresh cluster in `base` (not
    under the Processes marker: stopping the cluster and MLflow must leave the database up)."""
    bindir = postgres_bin()
    data, sock = base / "pg", base / "pgsock"
    for d in (data, sock):
        d.mkdir()
        shutil.chown(d, "postgres", "postgres")
    subprocess.run(as_postgres(str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8"),
                   check=True, capture_output=True, timeout=120)
    port = lb.free_port()
    subprocess.run(as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(sock / "pg.log"),
                               "-o", f"-p {port} -h 127.0.0.1 -k {sock}", "start"), check=True, capture_output=True,
                   timeout=90)
    subprocess.run(as_postgres(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"),
                   check=True, capture_output=True, timeout=60)
    return f"postgresql://mlflow@127.0.0.1:{port}/mlflow", data


def stop_postgres(data: Path) -> None:
    subprocess.run(as_postgres(str(postgres_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"),
                   capture_output=True, timeout=60)


def request(url: str, auth: tuple[str, str] | None = None) -> int:
    import base64

    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_pipeline_on_two_nodes_logs_to_an_authenticated_server_on_postgres():
    base = Path(tempfile.mkdtemp(prefix="stmpg-", dir="/tmp"))
    procs = lb.Processes(str(base))
    pg_base = Path(tempfile.mkdtemp(prefix="stmdb-", dir="/tmp"))
    pg_base.chmod(0o755)
    data = None
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "PATH": f"{lb.BIN}:{os.environ.get('PATH', '')}"}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "DVC_ROOT"):
        env.pop(key, None)
    try:
        backend, data = start_postgres(pg_base)
        port = lb.free_port()
        server_env = {**env, "MLFLOW_BACKEND_STORE_URI": backend, "MLFLOW_REQUIRE_DATABASE": "1",
                      "MLFLOW_ARTIFACTS_DESTINATION": str(base / "artifacts"), "MLFLOW_DATA_DIR": str(base / "mlflow"),
                      "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1", "MLFLOW_ALLOWED_HOSTS": lb.mlflow_allowed_hosts(),
                      "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN}
        refused = subprocess.run(["bash", str(REPO / "infra/mlflow/start-server.sh")], env=server_env,
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "MLFLOW_AUTH_ADMIN_PASSWORD is not set" in refused.stderr
        server = procs.start(["bash", str(REPO / "infra/mlflow/start-server.sh")], base / "mlflow.log",
                             {**server_env, "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD})
        tracking = f"http://127.0.0.1:{port}"

        # the nodes' environment holds the MLflow user (as the pods get it from the Secret); the job does not
        node_env = {**env, "MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
        head = lb.start_head(procs, base / "rh", base / "ray-head.log", cpus=1, env=node_env)
        proj = project_copy(base / "proj")
        make_tiny_davis(proj / "bench", frames=4, size=48, extra=2)
        from stm_core.model.checkpoint import save_checkpoint
        from stm_core.model.network import ModelConfig, STMNetwork

        torch.manual_seed(0)
        save_checkpoint(proj / "stm.ckpt", STMNetwork(ModelConfig(kind="stm", decoder_dim=16, norm="frozen_bn")))
        params = {"evaluate": {"variants": ["copy-first", "stm:first", "stm:previous"], "dataset": "bench",
                               "split": "val", "stm_model": "stm.ckpt", "num_cpus": 1, "overlays": 1,
                               "probe_sequences": 0},
                  "ray": {"eval_actors": 2}, "mlflow": {"experiment": "stm-postgres"}}
        (proj / "params-pg.yaml").write_text(yaml.safe_dump(params))
        lb.start_hidden_worker(procs, base, node_env, head.gcs_address, cpus=1, hide=[base / "rh"])
        lb.wait_nodes(head.dashboard_url, 2, 180, base / "ray-worker.log")
        lb.wait_http(f"{tracking}/health", 240, server, base / "mlflow.log")
        assert request(f"{tracking}/api/2.0/mlflow/experiments/search?max_results=5") == 401  # no credentials
        assert request(f"{tracking}/api/2.0/mlflow/experiments/search?max_results=5", (ADMIN, "wrong")) == 401

        runtime = {"env_vars": {"RAY_ADDRESS": head.gcs_address, "MLFLOW_TRACKING_URI": tracking}}
        job = subprocess.run([str(lb.BIN / "ray"), "job", "submit", "--address", head.dashboard_url, "--working-dir",
                              str(proj), "--runtime-env-json", json.dumps(runtime), "--", "bash", "-c",
                              f"{sys.executable} -m pipeline.cli evaluate --params params-pg.yaml && {sys.executable} "
                              "-c \"import json; print('NODES', json.dumps(json.load(open('results/evaluation.json'))"
                              "['nodes']))\""],
                             env=env, capture_output=True, text=True, timeout=600)
        assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
        nodes = json.loads(next(line for line in job.stdout.splitlines() if line.startswith("NODES "))[6:])
        assert len(nodes) == 2, nodes  # the work ran on both nodes
        procs.stop()  # the server and the cluster gone: what landed is in PostgreSQL itself

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=backend)
        (experiment,) = [e for e in client.search_experiments() if e.name == "stm-postgres"]
        runs = client.search_runs([experiment.experiment_id])
        parent = next(r for r in runs if r.data.tags.get("stm_role") == "evaluation")
        children = {r.data.tags["stm_variant"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert parent.info.status == "FINISHED" and children == {"copy-first", "stm-first", "stm-previous"}
        assert "stm-first.JF_mean" in parent.data.metrics
    finally:
        procs.stop()
        if data is not None:
            stop_postgres(data)
        left = procs.leftovers()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(pg_base, ignore_errors=True)
    assert not left, f"processes left running: {left}"
