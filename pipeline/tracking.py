"""MLflow helpers: the project's tracking store, experiments, and runs that survive restarts.

The default store is `sqlite:///<project root>/mlflow.db`, where the project root is `$DVC_ROOT`
when DVC runs the stage (queued experiments run in a temp copy: the database must not land
there) and otherwise the repository root above the params file. `MLFLOW_TRACKING_URI` (a server
on clusters) or `mlflow.tracking_uri` in params override it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT_MARKERS = (".dvc", ".git")
MAX_PARAM_LENGTH = 6000  # MLflow's limit for one param value


@dataclass
class MlflowParams:
    experiment: str = "stm-vos"  # MLflow experiment that every stage logs into
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///<project root>/mlflow.db


def workspace_root(params_file: str | Path | None = None) -> Path:
    """The nearest directory above the params file holding .dvc or .git: where a stage reads its
    inputs and writes its outputs. Under `dvc exp run --queue` that is DVC's temp copy."""
    start = Path(params_file).resolve().parent if params_file else Path.cwd().resolve()
    for folder in (start, *start.parents):
        if any((folder / marker).exists() for marker in ROOT_MARKERS):
            return folder
    return start


def project_root(params_file: str | Path | None = None) -> Path:
    """Where the shared MLflow store lives: $DVC_ROOT (DVC points it at the parent repository, also
    for queued experiments that run in a temp copy), else the workspace root. Stage inputs and
    outputs must not use it: in a queued experiment they belong to the temp copy
    (`workspace_root`)."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    return workspace_root(params_file)


def tracking_uri(root: str | Path | None = None, configured: str = "") -> str:
    """MLFLOW_TRACKING_URI wins (one server for a cluster), then params, then the local sqlite store."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if configured:
        return configured
    root = Path(root) if root is not None else project_root()
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def client(uri: str):
    from mlflow import MlflowClient

    # The registry too: left unset, it follows the process-wide registry URI, which any earlier
    # `mlflow.set_registry_uri` in this process (another stage, a test) may have pointed elsewhere.
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def artifact_location(uri: str) -> str | None:
    """Beside a local sqlite store: artifacts in `<root>/mlartifacts`, absolute, so a run started
    from a DVC temp copy or another working directory still lands in the project."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None  # a tracking server decides


def get_or_create_experiment(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_location(uri))
    except Exception:  # noqa: BLE001 - another process created it meanwhile
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(root: str | Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": "0.0001"} (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def standard_tags(root: str | Path, stage: str) -> dict[str, str]:
    """git commit of `root`, and the DVC stage (DVC's own name for it when DVC runs the command)."""
    tags = {"git_commit": git_commit(root), "dvc_stage": os.environ.get("DVC_STAGE") or stage}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    return tags


def create_run(uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """A new run (status RUNNING) with flattened params and tags; returns its id."""
    from mlflow.entities import Param, RunTag

    c = client(uri)
    run = c.create_run(get_or_create_experiment(uri, experiment), run_name=run_name, tags=tags)
    items = [Param(k, v) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        c.log_batch(run.info.run_id, params=items[i:i + 100], tags=[RunTag("mlflow.runName", run_name)] if i == 0 else [])
    return run.info.run_id


def run_exists(uri: str, run_id: str) -> bool:
    try:
        return client(uri).get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # noqa: BLE001 - MlflowException(RESOURCE_DOES_NOT_EXIST) and store errors alike
        return False


def reattach_run(uri: str, run_id: str) -> None:
    """Mark an existing run RUNNING again (after a crash it may read FAILED or RUNNING)."""
    client(uri).update_run(run_id, status="RUNNING")


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status, end_time=int(time.time() * 1000))


class RunLogger:
    """What rank 0 uses inside a training worker: metrics and images into an existing run.

    Never starts or ends the run (the driver owns its status), so a restarted worker simply
    keeps logging into the same run.
    """

    def __init__(self, uri: str, run_id: str):
        self.run_id = run_id
        self.client = client(uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def image(self, image, artifact_file: str) -> None:
        """image: uint8 H x W x 3 array (or PIL image)."""
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def tags(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self.client.set_tag(self.run_id, key, value)


@contextmanager
def system_metrics(uri: str, run_id: str) -> Iterator[None]:
    """CPU, memory, disk, network and (with `nvidia-ml-py` and a GPU) GPU use of this node, logged as
    `system/...` metrics of `run_id` while the block runs: the monitor `mlflow.start_run(...,
    log_system_metrics=True)` starts, for a run this project creates with a client. Every
    `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` s (default 10); a resumed run continues its steps."""
    import logging

    monitor = None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=uri)
        monitor.start()
    except Exception as err:  # noqa: BLE001 - system metrics are informative: the stage runs without them
        logging.getLogger("pipeline").warning("system metrics off for run %s: %s", run_id, err)
        monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()
