"""What each infra file hands the pipeline (params file, storage URI, tracking URI) is accepted on a
multi-node cluster: the same checks the stages make when they start, run from the files' values."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.cluster import ClusterError
from pipeline.preflight import check, fake_nodes

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
HEAD_IP = "10.0.0.1"


def launcher(name: str) -> dict[str, str]:
    cfg = yaml.safe_load((INFRA / name).read_text())
    env = dict(re.findall(r"--env (\w+)=(\S+)", " ".join(cfg["docker"]["run_options"])))
    head = " ".join(cfg["head_start_ray_commands"])
    env["MLFLOW_TRACKING_URI"] = re.search(r"MLFLOW_TRACKING_URI:-([^}]+)\}", head).group(1)
    env["STM_PARAMS"] = re.search(r"run-pipeline\.sh (\S+)", (INFRA / name).read_text()).group(1)
    return env


def rayjob() -> dict[str, str]:
    spec = yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())["spec"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    return {k: str(v) for k, v in env.items()}


def raycluster() -> dict[str, str]:
    spec = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())["spec"]
    container = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}  # valueFrom: from a Secret
    submit = re.search(r"run-pipeline\.sh( \S+)?", (INFRA / "kuberay" / "raycluster.yaml").read_text())
    env["STM_PARAMS"] = (submit.group(1) or "").strip() or "params.yaml"
    return env


FILES = {"cluster-aws.yaml": lambda: launcher("cluster-aws.yaml"), "cluster-gcp.yaml": lambda: launcher("cluster-gcp.yaml"),
         "kuberay/rayjob.yaml": rayjob, "kuberay/raycluster.yaml": raycluster}


@pytest.mark.parametrize("name", sorted(FILES))
def test_infra_params_pass_the_multi_node_checks(name, monkeypatch):
    env = FILES[name]()
    assert env.get("STM_STORAGE_ROOT", "").startswith(("s3://", "gs://")), f"{name}: no STM_STORAGE_ROOT URI"
    for key in ("STM_STORAGE_ROOT", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("DVC_ROOT", raising=False)
    found = check(REPO / env.get("STM_PARAMS", "params.yaml"), fake_nodes(3), driver_ip=HEAD_IP)
    root = env["STM_STORAGE_ROOT"].rstrip("/")
    shared = {k: v for k, v in found.items() if k != "MLFLOW_TRACKING_URI"}
    assert shared and all(v.startswith(root + "/") for v in shared.values()), shared
    assert "127.0.0.1" not in found["MLFLOW_TRACKING_URI"] and found["MLFLOW_TRACKING_URI"].startswith("http")


@pytest.mark.parametrize("name", ["params.yaml", "params-paper.yaml"])
def test_without_a_store_the_params_are_refused_on_a_cluster(name, monkeypatch):
    monkeypatch.delenv("STM_STORAGE_ROOT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    with pytest.raises(ClusterError, match="share no disk"):
        check(REPO / name, fake_nodes(2), driver_ip=HEAD_IP)
    monkeypatch.setenv("STM_STORAGE_ROOT", "s3://bucket/stm")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ClusterError, match="local store"):  # the sqlite default
        check(REPO / name, fake_nodes(2), driver_ip=HEAD_IP)


def test_one_ray_version_everywhere():
    import ray

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("ray["))
    version = pin.split("==")[1] if "==" in pin else None
    assert version, f"pyproject.toml: Ray is not pinned ({pin})"
    assert ray.__version__ == version, "the tests run another Ray than the one pinned"
    assert f"ARG RAY_VERSION={version}" in (INFRA / "Dockerfile").read_text()
    for name in ("rayjob.yaml", "raycluster.yaml"):
        spec = yaml.safe_load((INFRA / "kuberay" / name).read_text())["spec"]
        spec = spec.get("rayClusterSpec", spec)
        assert spec["rayVersion"] == version, name


def test_rayjob_deadline_covers_the_paper_recipe():
    """The paper trains STM 4 + 3 days on 4 GPUs; STRMN trains beside it: the deadline holds both."""
    spec = yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())["spec"]
    assert spec["activeDeadlineSeconds"] >= 2 * 7 * 24 * 3600
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["STM_PARAMS"] == "params-paper.yaml"
    assert shlex.split(spec["entrypoint"])[0] == "bash"
