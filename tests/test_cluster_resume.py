"""A cluster job killed in a later stage loses only that stage: the re-submitted job starts there.

A real Ray head on 127.0.0.1 (its own temp dir and ports, stopped by process id) runs
`bash infra/run-pipeline.sh` as a Ray job in a toy DVC repo of three stages (a: Ray tasks on the
cluster, metrics; b: plot data; c: blocks until released). The DVC remote is a directory that
stands in for s3://. The first job is stopped while `c` runs; the second job, submitted the same
way, restores `a` and `b` from the remote (DVC's run cache) and runs only `c`. On "your machine"
afterwards, `dvc repro --pull` then gets every output and the lock without running anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")
ray = pytest.importorskip("ray")

import loopback as lb  # noqa: E402 - after the skips
from loopback import RAY_CLI, RayHead, clean_env, job_status, wait_for  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
JOB_ID = "stm-resume-first"

STAGE = """\
import json
import os
import sys
import time
from pathlib import Path

import ray

from pipeline.cluster import init_ray

name, shared = sys.argv[1], Path(os.environ["STM_TEST_SHARED"])
with open(shared / "runs.log", "a") as log:
    log.write(name + "\\n")
Path("out").mkdir(exist_ok=True)
if name == "a":
    init_ray(num_cpus=1)
    square = ray.remote(num_cpus=1)(lambda x: x * x)
    values = ray.get([square.remote(i) for i in range(4)])
    Path("out/a.json").write_text(json.dumps({"values": values, "ray_address": os.environ.get("RAY_ADDRESS")}))
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/a.json").write_text(json.dumps({"sum": sum(values)}))
    ray.shutdown()
elif name == "b":
    values = json.loads(Path("out/a.json").read_text())["values"]
    Path("out/b.json").write_text(json.dumps({"double": [2 * v for v in values]}))
    Path("plots").mkdir(exist_ok=True)
    Path("plots/b.csv").write_text("step,loss\\n" + "".join(f"{i},{v}\\n" for i, v in enumerate(values)))
else:
    (shared / "c-started").write_text(str(os.getpid()))
    deadline = time.monotonic() + 600
    while not (shared / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.5)  # the first job is stopped here
    Path("out/c.json").write_text(Path("out/b.json").read_text())
"""

DVC_YAML = """\
stages:
  c:
    cmd: python stage.py c
    deps: [stage.py, out/b.json]
    outs: [out/c.json]
  a:
    cmd: python stage.py a
    deps: [stage.py]
    params: [toy.n]
    outs: [out/a.json]
    metrics:
      - metrics/a.json:
          cache: false
  b:
    cmd: python stage.py b
    deps: [stage.py, out/a.json]
    outs: [out/b.json]
    plots:
      - plots/b.csv:
          cache: false
"""


@pytest.fixture(scope="module")
def head():
    workdir = Path(tempfile.mkdtemp(prefix="stmres-", dir="/tmp"))  # short: Ray's socket paths
    procs = lb.Processes(marker=str(workdir / "ray"))
    try:
        yield lb.start_head(procs, workdir / "ray", workdir / "ray-start.log", 2, 200_000_000), workdir
    finally:
        procs.stop()
        leftovers = procs.leftovers()
        shutil.rmtree(workdir, ignore_errors=True)
        assert not leftovers, f"Ray processes still running after teardown: {leftovers}"


def toy_repo(root: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "infra").mkdir()
    for script in ("run-pipeline.sh", "dvc_stages.py"):
        shutil.copy2(REPO / "infra" / script, root / "infra" / script)
    (root / "stage.py").write_text(STAGE)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text("toy:\n  n: 4\n")
    env = clean_env()
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")  # the project's `cluster` remote
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "toy"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root


def job(head: RayHead, repo: Path, env_vars: dict, *extra: str) -> subprocess.CompletedProcess:
    # Ray unpacks identical working dirs into one folder per node and reuses it, so a second job would
    # find the first one's outputs there. A file unique to each submission gives each job a fresh
    # copy, as a new cluster (a KubeRay RayJob) would: everything it reuses must come from the remote.
    (repo / "submission.txt").write_text(f"{time.time_ns()}\n")
    return subprocess.run(
        [RAY_CLI, "job", "submit", "--address", head.dashboard_url, "--working-dir", ".", *extra,
         "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", "bash", "infra/run-pipeline.sh"],
        cwd=repo, env=clean_env(DVC_NO_ANALYTICS="1"), capture_output=True, text=True, timeout=300)


def test_killed_job_resumes_from_the_stage_that_failed(head):
    ray_head, workdir = head
    repo = toy_repo(workdir / "toy")
    shared, remote = workdir / "shared", workdir / "remote"  # remote: stands in for s3://bucket/stm-vos/dvc
    shared.mkdir()
    env_vars = {"STM_DVC_REMOTE": str(remote), "STM_TEST_SHARED": str(shared), "DVC_NO_ANALYTICS": "1"}

    first = job(ray_head, repo, env_vars, "--no-wait", "--submission-id", JOB_ID)
    assert first.returncode == 0, first.stdout + first.stderr
    wait_for(lambda: (shared / "c-started").exists(), 240, "stage c never started",
             lambda: job_status(ray_head, JOB_ID))
    stop = subprocess.run([RAY_CLI, "job", "stop", "--address", ray_head.dashboard_url, JOB_ID],
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    wait_for(lambda: "stopped" in job_status(ray_head, JOB_ID).lower(), 60, "the first job did not stop",
             lambda: job_status(ray_head, JOB_ID))
    pid = int((shared / "c-started").read_text())
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 30,
             f"stage c (pid {pid}) outlived its job")
    assert (shared / "runs.log").read_text().split() == ["a", "b", "c"]
    assert (remote / "runs").is_dir(), "the run cache of a and b did not reach the remote before c"

    (shared / "release").touch()
    started = time.monotonic()
    second = job(ray_head, repo, env_vars)
    output = second.stdout + second.stderr
    assert second.returncode == 0, f"re-submitted job failed:\n{output[-5000:]}"
    assert (shared / "runs.log").read_text().split() == ["a", "b", "c", "c"], "a or b ran again"
    assert "Running stage 'a'" not in output and "Running stage 'b'" not in output, output[-5000:]
    assert "Running stage 'c'" in output, output[-5000:]
    assert "is cached - skipping run" in output, output[-5000:]
    assert not (repo / "out").exists(), "the job must not write into the submitting checkout"
    print(f"\nre-submitted job: a, b restored from the remote, c run, {time.monotonic() - started:.1f} s")

    # Your machine: the run's outputs and lock from the remote, nothing run.
    env = clean_env(DVC_NO_ANALYTICS="1", STM_TEST_SHARED=str(shared))
    for cmd in (["dvc", "remote", "add", "--local", "--force", "cluster", str(remote)],
                ["dvc", "remote", "default", "--local", "cluster"], ["dvc", "repro", "--pull"]):
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"
    assert "Running stage" not in done.stdout, done.stdout
    assert (shared / "runs.log").read_text().split() == ["a", "b", "c", "c"]
    made = json.loads((repo / "out/a.json").read_text())
    assert made["values"] == [0, 1, 4, 9] and made["ray_address"], "stage a did not run inside the Ray job"
    assert json.loads((repo / "metrics/a.json").read_text()) == {"sum": 14}
    assert (repo / "plots/b.csv").read_text().startswith("step,loss\n0,0\n")
    assert (repo / "out/c.json").is_file()
    status = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout
    assert os.path.exists(repo / "dvc.lock")
