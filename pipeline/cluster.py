"""Connect to Ray: an existing cluster when RAY_ADDRESS is set, else a local one on this machine."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)
LOOPBACK = ("127.", "localhost", "::1", "0.0.0.0")


class ClusterError(RuntimeError):
    """A setting that works on one machine but not on a cluster whose nodes share no disk."""


def init_ray(num_cpus: int | None = None, object_store_memory: int | None = None, **kwargs):
    """`ray.init` once per process. `num_cpus` and `object_store_memory` only apply to a local
    (not yet running) Ray; a cluster's head decides its own resources, and Ray refuses them there.

    The dashboard is left off locally (it needs extra processes and ports the stages do not use);
    on a cluster the head's settings apply. Inside a `ray job submit` job, Ray sets RAY_ADDRESS,
    so every stage joins the cluster the job runs on.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = os.environ.get("RAY_ADDRESS") or None
    options: dict = {"address": address, "ignore_reinit_error": True, "log_to_driver": True}
    if address is None:
        options.update(num_cpus=num_cpus, include_dashboard=False)
        if object_store_memory is not None:
            options["object_store_memory"] = object_store_memory
        log.info("Ray: starting a local instance (num_cpus=%s)", num_cpus)
    else:
        log.info("Ray: connecting to the cluster at RAY_ADDRESS=%s", address)
    options.update(kwargs)
    previous = signal.getsignal(signal.SIGTERM)
    context = ray.init(**options)
    # ray.init sets its own SIGTERM handler (sys.exit(15)): a stage's own (pipeline/runguard.py:
    # stop, end the run KILLED, exit 143) stays in place
    if callable(previous) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
    return context


def on_driver_node() -> dict:
    """Ray remote options that keep a task or actor on this driver's node.

    On a multi-node cluster the stage's local files (the job's working directory on the head:
    `data/raw/...`, Parquet shards a stage writes) exist on the driver's node only. Tasks that
    open such paths pass `**on_driver_node()` to `.options(...)` / `ray_remote_args`; on one
    machine it changes nothing. Needs Ray initialised.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ----------------------------------------------------------------- what a multi-node cluster needs
def alive_nodes() -> list[dict]:
    """Alive nodes of the connected cluster (needs Ray initialised)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def node_ips(nodes: list[dict] | None = None) -> list[str]:
    return sorted({n["NodeManagerAddress"] for n in (alive_nodes() if nodes is None else nodes)})


def on_cluster() -> bool:
    """This process runs against a Ray cluster (RAY_ADDRESS set by the user or by `ray job submit`),
    not a Ray instance of its own. A cluster may gain nodes at any time (an autoscaler adds them
    after the stage starts), so its nodes are never assumed to share this node's disk."""
    return bool(os.environ.get("RAY_ADDRESS"))


def is_multi_node(nodes: list[dict] | None = None) -> bool:
    """A run against a cluster, or more than one node up: the stage's local files are not where its
    tasks may run, now or once the cluster grows."""
    if on_cluster():
        return True
    nodes = alive_nodes() if nodes is None else nodes
    return len(nodes) > 1


def require_shared(stage: str, locations: Mapping[str, str], nodes: list[dict] | None = None) -> None:
    """Raise before any work starts when a location that other nodes must read or write is a local
    path and Ray runs on more than one node. `locations`: params key -> path or URI."""
    nodes = alive_nodes() if nodes is None else nodes
    if not is_multi_node(nodes):
        return
    local = {k: v for k, v in locations.items() if v and "://" not in str(v)}
    if local:
        where = os.environ.get("RAY_ADDRESS") or "the connected cluster"
        names = "; ".join(f"{k} = {v}" for k, v in local.items())
        raise ClusterError(
            f"{names}: a local path, but Ray at {where} is a cluster ({len(nodes)} nodes now, more may join) whose "
            f"nodes share no disk, so the tasks of `stm {stage}` on other nodes would not find it. Set storage.root to a URI every node reaches "
            "(s3://bucket/prefix, gs://..., or file:// on a shared mount), or give these keys URIs.")


def is_loopback(host: str | None) -> bool:
    return not host or host.startswith(LOOPBACK)


def server_answers(uri: str, timeout_s: float = 3.0) -> bool:
    """An HTTP server at `uri` takes requests addressed to it: any status (a login-protected server
    answers 401) but 403, which MLflow gives a Host it does not accept (`--allowed-hosts`)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/version", timeout=timeout_s):
            return True
    except urllib.error.HTTPError as err:
        return err.code != 403
    except (OSError, ValueError):
        return False


def resolve_tracking_uri(uri: str, nodes: list[dict] | None = None, driver_ip: str | None = None,
                         answers: Callable[[str], bool] = server_answers) -> str:
    """The MLflow address every node can use.

    One machine: unchanged. A cluster: a loopback server address (a head exporting
    http://127.0.0.1:5000) becomes the driver node's address, which every node reaches, including
    nodes that join later (the server must listen on it: `mlflow server --host 0.0.0.0`); a server
    that does not take requests there is refused before any work, so no worker is handed a
    loopback address. A database or file store (sqlite, file paths) would be one
    private store per node: refused with a clear error.
    """
    nodes = alive_nodes() if nodes is None else nodes
    if not is_multi_node(nodes):
        return uri
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https", "databricks"):
        raise ClusterError(
            f"MLflow tracking URI {uri!r}: a local store, but Ray runs as a cluster ({len(nodes)} nodes now); each "
            "node would write its own. Start one `mlflow server` (infra/mlflow/) and set MLFLOW_TRACKING_URI (or "
            "mlflow.tracking_uri) to its http:// address.")
    if parts.scheme == "databricks" or not is_loopback(parts.hostname):
        return uri
    if driver_ip is None:
        import ray

        me = ray.get_runtime_context().get_node_id()
        driver_ip = next((n["NodeManagerAddress"] for n in nodes if n.get("NodeID") == me), None)
    if not driver_ip:
        raise ClusterError(
            f"MLflow tracking URI {uri!r}: a loopback address, and this driver's node address is unknown; give the "
            "server's address that every node reaches.")
    ips = node_ips(nodes)
    if is_loopback(driver_ip):
        if all(is_loopback(ip) for ip in ips):
            return uri  # the cluster was started on loopback: all of its nodes are on this host
        raise ClusterError(
            f"MLflow tracking URI {uri!r}: a loopback address, but the cluster's nodes are at {', '.join(ips)}; "
            "give the server's address that every node reaches.")
    netloc = driver_ip + (f":{parts.port}" if parts.port else "")
    resolved = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    if answers(resolved):
        log.info("MLflow: %s is loopback; the cluster's nodes use the driver node's address %s", uri, resolved)
        return resolved
    raise ClusterError(
        f"MLflow tracking URI {uri!r}: a loopback address, which the cluster's nodes ({', '.join(ips)}) and those "
        f"that join later cannot use, and no server takes requests at the driver node's address {resolved}. Start "
        "it with `mlflow server --host 0.0.0.0` (and `--allowed-hosts` naming that address if it is not a private "
        "IP), or give the server's address that every node reaches.")
