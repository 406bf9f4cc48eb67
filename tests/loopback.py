"""Real services on loopback for the two-node test: a moto S3 server, an `mlflow server`, and a Ray
cluster of two nodes whose second node lives in its own mount namespace.

Every process is started in its own session and stopped by its process group; anything left that
names this run's private folder in its command line is then killed by pid. Nothing here touches
Ray processes that other people run on the machine (fresh ports, a private temp dir).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
RAY_CLI = str(BIN / "ray")
# Loopback test heads: no token (Ray >= 2.59 turns token auth on for new local clusters).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
PORT_FLAGS = ("--port", "--object-manager-port", "--node-manager-port", "--ray-client-server-port",
              "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--runtime-env-agent-port", "--metrics-export-port")


def free_port() -> int:
    (port,) = free_ports(1)
    return port


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now (all sockets held open together, so no repeats)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without a Ray or MLflow address of its own, this venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **RAY_ENV, **extra}


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Until `url` answers 2xx/3xx (urllib raises on the others); fails early when `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) before {url} answered:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s:\n{tail(log)}")


def wait_for(predicate, timeout: float, what: str, details=lambda: "") -> None:
    """Poll `predicate` each second; TimeoutError naming `what` (and `details()`) when it never holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise TimeoutError(f"{what} after {timeout:.0f} s\n{details()}")


def tail(log: Path | None, n: int = 4000) -> str:
    if log is None or not log.is_file():
        return ""
    return log.read_text(errors="replace")[-n:]


class Processes:
    """Started processes (each a session leader) and the marker that names leftovers as ours."""

    def __init__(self, marker: str):
        self.marker = marker
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        out = log.open("wb")
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def stop(self, timeout: float = 20) -> None:
        for proc in reversed(self.procs):
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)

    def leftovers(self) -> list[int]:
        """Our processes still alive: their command line names this run's private folder."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if self.marker in cmdline:
                pids.append(int(entry.name))
        return pids


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start_moto(procs: Processes, base: Path, env: dict[str, str]) -> str:
    port = free_port()
    proc = procs.start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], base / "moto.log", env)
    url = f"http://127.0.0.1:{port}"
    wait_http(url, 60, proc, base / "moto.log")
    return url


def node_address() -> str:
    """The address Ray registers this host's nodes at (even when started at 127.0.0.1): the one a
    stage hands its nodes in place of a loopback MLflow address."""
    import ray

    return ray.util.get_node_ip_address()


def mlflow_allowed_hosts() -> str:
    """`--allowed-hosts` of an MLflow server listening as on a cluster's head (0.0.0.0): loopback and
    the node address."""
    return f"localhost:*,127.0.0.1:*,{node_address()}:*"


def start_mlflow(procs: Processes, base: Path, env: dict[str, str], artifacts: str) -> tuple[str, subprocess.Popen]:
    """-> (URL, process): not waited for (it starts in parallel with Ray); see wait_mlflow."""
    port = free_port()
    args = [sys.executable, "-m", "mlflow", "server", "--host", "0.0.0.0", "--port", str(port),
            "--allowed-hosts", mlflow_allowed_hosts(), "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
            "--artifacts-destination", artifacts, "--workers", "1"]
    proc = procs.start(args, base / "mlflow.log", env)
    return f"http://127.0.0.1:{port}", proc


def wait_mlflow(url: str, proc: subprocess.Popen, base: Path) -> None:
    wait_http(f"{url}/health", 240, proc, base / "mlflow.log")


# Ports every node takes for its agents: two nodes on one address must not share them.
AGENT_PORT_FLAGS = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                    "--metrics-export-port")


def agent_ports() -> list[str]:
    return [f"{flag}={port}" for flag, port in zip(AGENT_PORT_FLAGS, free_ports(len(AGENT_PORT_FLAGS)))]


def start_hidden_worker(procs: Processes, base: Path, env: dict[str, str], address: str, cpus: int,
                        hide: list[Path]) -> subprocess.Popen:
    """A second node in its own mount namespace: every folder in `hide` is an empty tmpfs there, so it
    sees none of the head's files in them (the head's Ray temp dir, the project's outputs)."""
    mounts = " && ".join(f"mount -t tmpfs -o size=64m none {_q(p)}" for p in hide)
    ray = " ".join(_q(a) for a in [str(BIN / "ray"), "start", "--block", "--address", address, "--node-ip-address",
                                   "127.0.0.1", "--num-cpus", str(cpus), "--num-gpus", "0", "--temp-dir",
                                   str(base / "rw"), *agent_ports()])
    # A raylet that cannot reach the GCS in time on a loaded machine exits ("timed out during
    # startup"): try again a few times before the test's own node wait gives up.
    script = f"set -e; {mounts}; for attempt in 1 2 3; do {ray} && exit 0; echo retrying >&2; sleep 5; done; exit 1"
    return procs.start(["unshare", "-m", "--propagation", "private", "bash", "-c", script], base / "ray-worker.log", env)


def _q(s: str | Path) -> str:
    return "'" + str(s).replace("'", "'\\''") + "'"


def alive_nodes(dashboard: str) -> list[dict]:
    with urllib.request.urlopen(f"{dashboard}/nodes?view=summary", timeout=10) as r:
        data = json.loads(r.read())
    return [n["raylet"] for n in data["data"]["summary"] if n.get("raylet", {}).get("state") == "ALIVE"]


def wait_nodes(dashboard: str, count: int, timeout: float, log: Path) -> list[dict]:
    """The alive nodes, once there are `count` of them (the dashboard may not answer at first)."""
    nodes: list[dict] = []

    def enough() -> bool:
        nonlocal nodes
        try:
            nodes = alive_nodes(dashboard)
        except (OSError, KeyError, ValueError):
            nodes = []
        return len(nodes) >= count

    wait_for(enough, timeout, f"fewer than {count} Ray nodes alive", lambda: tail(log))
    return nodes


# ----------------------------------------------------------------- a Ray head on loopback
@dataclass
class RayHead:
    gcs_address: str  # host:port, what RAY_ADDRESS / ray.init take
    dashboard_url: str  # http://host:port, what `ray job submit --address` takes
    temp_dir: str


def start_head(procs: Processes, temp_dir: Path, log: Path, cpus: int, object_store_bytes: int | None = None,
               env: dict[str, str] | None = None) -> RayHead:
    """`ray start --head` with every port fresh and its own temp dir (pass `procs` a marker naming
    it); returns once the jobs API answers. `env`: the head's environment (default: clean_env())."""
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    memory = [] if object_store_bytes is None else [f"--object-store-memory={object_store_bytes}"]
    args = [RAY_CLI, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
            "--disable-usage-stats", *memory, *(f"{flag}={port}" for flag, port in ports.items())]
    proc = procs.start(args, log, clean_env() if env is None else {**env, **RAY_ENV})
    head = RayHead(f"127.0.0.1:{ports['--port']}", f"http://127.0.0.1:{ports['--dashboard-port']}", str(temp_dir))
    wait_http(f"{head.dashboard_url}/api/version", 180, proc, log)
    wait_http(f"{head.dashboard_url}/api/jobs/", 30, proc, log)
    return head


def job_status(head: RayHead, job_id: str) -> str:
    """`ray job status` output (for waits and failure messages)."""
    done = subprocess.run([RAY_CLI, "job", "status", "--address", head.dashboard_url, job_id],
                          env=clean_env(), capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


# --------------------------------------------- a one-machine cluster whose nodes have small disks
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
MLFLOW_USER = "admin"


@dataclass
class Services:
    """What outlives a cluster (as a bucket and a tracking server outlive a deleted RayJob): a moto S3
    server holding `bucket`, and an authenticated `mlflow server` listening as on a cluster's head."""

    base: Path
    s3: str
    bucket: str
    tracking: str
    password: str

    def env(self) -> dict[str, str]:
        """What every process of a run needs to reach the store and MLflow."""
        return {**CREDS, "AWS_ENDPOINT_URL": self.s3, "MLFLOW_S3_ENDPOINT_URL": self.s3,
                "MLFLOW_TRACKING_URI": self.tracking, "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
                "MLFLOW_TRACKING_PASSWORD": self.password}

    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3, region_name=CREDS["AWS_DEFAULT_REGION"],
                            **{k.lower(): CREDS[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})

    def keys(self, prefix: str) -> dict[str, int]:
        """Store key -> size of every object under `prefix` of the bucket."""
        pages = self.s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def start_services(procs: Processes, base: Path, bucket: str = "stm") -> Services:
    """moto S3 (with `bucket`) and `mlflow server --app-name basic-auth` (artifacts in the bucket)."""
    env = {**clean_env(), **CREDS}
    s3 = start_moto(procs, base, env)
    password = "loopback-" + os.urandom(8).hex()
    services = Services(base, s3, bucket, "", password)
    services.s3_client().create_bucket(Bucket=bucket)
    config = base / "basic_auth.ini"
    config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{base}/auth.db\nadmin_username = "
                      f"{MLFLOW_USER}\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    args = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "0.0.0.0", "--port",
            str(port), "--allowed-hosts", mlflow_allowed_hosts(), "--backend-store-uri",
            f"sqlite:///{base / 'mlflow.db'}", "--artifacts-destination", f"s3://{bucket}/mlartifacts", "--workers", "1"]
    auth = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex()}
    proc = procs.start(args, base / "mlflow.log", {**env, "AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3, **auth})
    services.tracking = f"http://127.0.0.1:{port}"
    wait_mlflow(services.tracking, proc, base)
    return services


@dataclass
class Node:
    """`ray start` in its own mount namespace: /tmp (TMPDIR, the caches, ~/.cache) a tmpfs of disk_mb."""

    name: str
    proc: subprocess.Popen  # the shell inside the namespace (nsenter's target)
    disk_mb: int
    log: Path

    def disk_used(self) -> int:
        """Bytes used now on the node's tmpfs (seen through its namespace)."""
        st = os.statvfs(f"/proc/{self.proc.pid}/root/tmp")
        return (st.f_blocks - st.f_bfree) * st.f_frsize


NODE_DISK = "/tmp"
NODE_ENV = {"TMPDIR": NODE_DISK, "STM_NODE_CACHE": f"{NODE_DISK}/stm-cache", "XDG_CACHE_HOME": f"{NODE_DISK}/.cache"}


@dataclass
class Cluster:
    """A head with 0 CPUs and worker nodes with small disks; `stop()` deletes it (the services stay)."""

    services: Services
    procs: Processes
    head: RayHead
    nodes: list[Node]
    home: Path  # Ray's temp folders and the logs

    def env(self, **extra: str) -> dict[str, str]:
        """A driver's environment: this cluster, the store, MLflow, a node's disk for its temp files."""
        return {**clean_env(), **self.services.env(), **NODE_ENV, "RAY_ADDRESS": self.head.gcs_address,
                "PYTHONUNBUFFERED": "1", **extra}

    def run_on(self, node: int, args: list[str], cwd: Path, timeout: float, **extra: str) -> subprocess.CompletedProcess:
        """`args` as a driver on worker node `node`, inside its mount namespace (cwd entered there: --wd
        would keep the host's mount of it, and renames would cross mounts)."""
        target = ["nsenter", "-t", str(self.nodes[node].proc.pid), "-m", "--", "bash", "-c", 'cd "$0" && exec "$@"',
                  str(cwd), *args]
        return subprocess.run(target, cwd=cwd, env=self.env(**extra), capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        self.procs.stop()
        left = self.procs.leftovers()
        assert not left, f"processes left running: {left}"
        shutil.rmtree(self.home, ignore_errors=True)


def start_cluster(services: Services, base: Path, workers: int = 2, cpus: int = 1, disk_mb: int = 16,
                  tag: str = "c", pythonpath: str = "") -> Cluster:
    """Ray's temp folders are short paths in `base/tag` (base under /var/tmp: Unix socket paths are
    limited to 107 bytes, and a driver in another namespace must see the head's session folder).
    `pythonpath`: the code every node's workers import (a cluster image's installed project)."""
    (home := base / tag).mkdir(parents=True, exist_ok=True)
    procs = Processes(f"{home}/")
    env = {**clean_env(), **services.env(), **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    env.pop("MLFLOW_TRACKING_URI")
    head = start_head(procs, home / "h", home / "head.log", cpus=0, env=env)
    cache = Path(os.path.expanduser("~")) / ".cache"
    mounts = (f"mount -t tmpfs -o size={disk_mb}m none {NODE_DISK} && mkdir -p {NODE_DISK}/.cache {_q(cache)} && "
              f"mount --bind {NODE_DISK}/.cache {_q(cache)}")
    nodes = []
    for i in range(workers):
        ray = " ".join(_q(a) for a in [RAY_CLI, "start", "--block", "--address", head.gcs_address,
                                       "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus), "--num-gpus", "0",
                                       "--temp-dir", str(home / str(i)), *agent_ports()])
        script = f"set -e; {mounts}; for attempt in 1 2 3; do {ray} && exit 0; echo retrying >&2; sleep 5; done; exit 1"
        log = home / f"node{i}.log"
        proc = procs.start(["unshare", "-m", "--propagation", "private", "bash", "-c", script], log,
                           {**env, **NODE_ENV, "PYTHONUNBUFFERED": "1"})
        nodes.append(Node(f"{tag}{i}", proc, disk_mb, log))
    cluster = Cluster(services, procs, head, nodes, home)
    try:
        wait_nodes(head.dashboard_url, workers + 1, 240, nodes[-1].log)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def project_copy(repo: Path, dest: Path) -> Path:
    """The repository's files as `ray job submit --working-dir` would upload them (no venv, no outputs)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    for rel in (r for r in listed if r and (repo / r).is_file()):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, dest / rel)
    return dest
