"""A real Ray cluster on 127.0.0.1: job submission, shared storage, one MLflow server, `init_ray`.

The head is started with `ray start --head --block` in its own temp dir and ports, so it never
meets another Ray on this machine (nor `ray.init()` calls elsewhere: the cluster's address file
lives in that temp dir). The job runs the project's code from an uploaded working dir, segments
tiny built-in videos with a random-init STM on Ray tasks, writes palette PNGs to a directory that
stands in for shared storage, and logs to an MLflow server started by infra/mlflow/start-server.sh.
Teardown stops every process of the cluster and the server by its own process id.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.dashboard", reason="`ray start` with a dashboard needs ray[default]")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY_CLI = str(BIN / "ray")
CLUSTER_CPUS = 2
# Loopback test head: no token (Ray >= 2.59 turns token auth on for new local clusters).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
PORT_FLAGS = ("--port", "--object-manager-port", "--node-manager-port", "--ray-client-server-port",
              "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--runtime-env-agent-port", "--metrics-export-port")


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now (all sockets held open together, so no repeats)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **RAY_ENV, **extra}


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready at {url} after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def own_processes(root_pid: int, marker: str | None) -> list[psutil.Process]:
    """The process tree under root_pid, plus any process whose command line names our private temp
    dir (Ray daemons that re-parent themselves). Never matches by program name."""
    found: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(root_pid)
        found.update({p.pid: p for p in [root, *root.children(recursive=True)]})
    except psutil.NoSuchProcess:
        pass
    if marker:
        for p in psutil.process_iter(["cmdline"]):
            try:
                if marker in " ".join(p.info["cmdline"] or []):
                    found[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_processes(root: subprocess.Popen, marker: str | None) -> list[str]:
    """SIGTERM, then SIGKILL after a grace period; returns what is still alive (should be nothing)."""
    procs = own_processes(root.pid, marker)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    try:
        root.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    leftovers = []
    for p in own_processes(root.pid, marker):
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                leftovers.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            continue
    return leftovers


@dataclass
class MlflowServer:
    url: str
    proc: subprocess.Popen
    log: Path

    def wait_ready(self, timeout: float = 90) -> str:
        wait_http(f"{self.url}/health", self.proc, self.log, timeout, "mlflow server")
        return self.url


@dataclass
class RayHead:
    gcs_address: str  # host:port, what RAY_ADDRESS / ray.init take
    dashboard_url: str  # http://host:port, what `ray job submit --address` takes
    temp_dir: str


@pytest.fixture(scope="module")
def workdir():
    # A short path: Ray's unix sockets live under the temp dir (108-byte limit).
    path = tempfile.mkdtemp(prefix="stmray-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(workdir):
    """infra/mlflow/start-server.sh on 127.0.0.1 with a sqlite store; started before the cluster so
    both warm up together. Tests call wait_ready()."""
    (port,) = free_ports(1)
    log = workdir / "mlflow-server.log"
    env = clean_env(MLFLOW_DATA_DIR=str(workdir / "mlflow"), MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(port),
                    MLFLOW_WORKERS="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(REPO / "infra" / "mlflow" / "start-server.sh")], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", proc, log)
    try:
        yield server
    finally:
        leftovers = stop_processes(proc, marker=str(workdir / "mlflow"))
        assert not leftovers, f"mlflow server processes still running: {leftovers}"


@pytest.fixture(scope="module")
def ray_head(workdir, mlflow_server):
    temp_dir = str(workdir / "ray")
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    cmd = [RAY_CLI, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={CLUSTER_CPUS}",
           "--num-gpus=0", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           "--object-store-memory=100000000", *(f"{flag}={port}" for flag, port in ports.items())]
    log = workdir / "ray-start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=clean_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"127.0.0.1:{ports['--port']}", f"http://127.0.0.1:{ports['--dashboard-port']}", temp_dir)
    try:
        wait_http(f"{head.dashboard_url}/api/version", proc, log, 90, "ray head (dashboard)")
        wait_http(f"{head.dashboard_url}/api/jobs/", proc, log, 30, "ray jobs API")
        yield head
    finally:
        if ray.is_initialized():
            ray.shutdown()
        leftovers = stop_processes(proc, marker=temp_dir)
        assert not leftovers, f"Ray processes still running after teardown: {leftovers}"


JOB = '''
    """Runs as a Ray job on the test cluster: segment tiny built-in videos with stm_core on Ray tasks."""

    import json
    import os
    import sys
    from pathlib import Path

    import numpy as np
    import ray

    from pipeline.cluster import init_ray


    @ray.remote(num_cpus=1)
    def segment(seq: int, shared: str) -> dict:
        import torch

        import stm_core
        from stm_core.data import BuiltinVideosConfig, write_index_mask
        from stm_core.data.builtin_videos import make_sequence
        from stm_core.inference import segment_video
        from stm_core.model.network import ModelConfig, STMNetwork

        torch.manual_seed(seq)
        torch.set_num_threads(1)
        frames, masks = make_sequence(BuiltinVideosConfig(height=64, width=64, frames=4),
                                      np.random.default_rng(seq), n_obj=1)
        network = STMNetwork(ModelConfig(backbone="resnet18", pretrained="none"))
        tensors = (torch.from_numpy(f).permute(2, 0, 1).float() / 255 for f in frames)
        out = Path(shared) / "results" / f"seq{seq}"
        count = 0
        for t, pred in enumerate(segment_video(network, tensors, {0: torch.from_numpy(masks[0]).long()},
                                               memory="every:2")):
            assert pred.shape == (64, 64)
            write_index_mask(out / f"{t:05d}.png", pred.numpy())
            count += 1
        return {"sequence": out.name, "frames": count, "node": ray.get_runtime_context().get_node_id(),
                "stm_core": stm_core.__file__, "cwd": os.getcwd()}


    def main() -> None:
        shared = Path(sys.argv[1])
        init_ray(num_cpus=1)  # RAY_ADDRESS is set by the job: joins the cluster, num_cpus is ignored
        summary = {"ray_address": os.environ.get("RAY_ADDRESS"), "cluster_cpus": ray.cluster_resources()["CPU"],
                   "sequences": ray.get([segment.remote(i, str(shared)) for i in range(2)])}
        if os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            mlflow.set_experiment("stm-cluster-test")
            with mlflow.start_run(run_name="cluster-job") as run:
                mlflow.log_metric("frames", sum(s["frames"] for s in summary["sequences"]))
                mlflow.log_dict(summary, "summary.json")  # through the server's artifact proxy
            summary["mlflow_run_id"] = run.info.run_id
        tmp = shared / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary))
        os.replace(tmp, shared / "summary.json")
        print("job done:", json.dumps(summary))


    if __name__ == "__main__":
        main()
'''


def job_working_dir(root: Path) -> Path:
    """What `--working-dir` uploads: the project's packages and the job script (no run outputs)."""
    root.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("stm_core", "pipeline"):
        shutil.copytree(REPO / package, root / package, ignore=ignore)
    (root / "job.py").write_text(textwrap.dedent(JOB).lstrip())
    return root


def test_ray_job_submit_runs_stm_core_on_the_cluster(ray_head, mlflow_server, workdir):
    from ray.job_submission import JobStatus, JobSubmissionClient

    job_dir = job_working_dir(workdir / "job")
    shared = workdir / "shared-storage"  # stands in for s3://...: a path every node can reach
    shared.mkdir()
    tracking = mlflow_server.wait_ready()
    submission_id = f"stm-cluster-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": tracking, "PYTHONUNBUFFERED": "1"}}
    started = time.monotonic()
    result = subprocess.run(
        [RAY_CLI, "job", "submit", "--address", ray_head.dashboard_url, "--submission-id", submission_id,
         "--working-dir", str(job_dir), "--runtime-env-json", json.dumps(runtime_env),
         "--", sys.executable, "job.py", str(shared)],
        env=clean_env(), capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"ray job submit failed ({elapsed:.0f} s):\n{output[-4000:]}"

    status = JobSubmissionClient(ray_head.dashboard_url).get_job_status(submission_id)
    assert status == JobStatus.SUCCEEDED, output[-4000:]

    summary = json.loads((shared / "summary.json").read_text())
    assert summary["ray_address"], "the job did not see RAY_ADDRESS"
    assert summary["cluster_cpus"] == CLUSTER_CPUS  # joined the cluster, did not start its own Ray
    for seq in summary["sequences"]:
        assert seq["frames"] == 4
        pngs = sorted((shared / "results" / seq["sequence"]).glob("*.png"))
        assert [p.name for p in pngs] == [f"{t:05d}.png" for t in range(4)]
        # Workers import the project from the uploaded working dir, not from this checkout.
        assert not seq["stm_core"].startswith(str(REPO)), seq["stm_core"]
        assert Path(seq["stm_core"]).parent.parent == Path(seq["cwd"])

    from PIL import Image

    with Image.open(shared / "results" / "seq0" / "00000.png") as im:
        assert im.mode == "P" and im.size == (64, 64)

    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=tracking).get_run(summary["mlflow_run_id"])
    assert run.data.metrics["frames"] == 8
    artifacts = [a.path for a in MlflowClient(tracking_uri=tracking).list_artifacts(run.info.run_id)]
    assert "summary.json" in artifacts
    print(f"ray job submit -> SUCCEEDED in {elapsed:.1f} s")


def test_init_ray_joins_the_cluster_from_ray_address(ray_head, monkeypatch):
    from pipeline.cluster import init_ray, shutdown_ray

    monkeypatch.setenv("RAY_ADDRESS", ray_head.gcs_address)
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    assert not ray.is_initialized()
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
        assert init_ray() is not None  # a second call is a no-op, not a second connection
    finally:
        shutdown_ray()
    assert not ray.is_initialized()
