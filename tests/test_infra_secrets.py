"""infra/ gives every cluster process the MLflow credentials and bucket access from secrets, and
runs the tracking server on PostgreSQL with auth on; start-server.sh refuses, with a message, to
start without its secrets or (on clusters) on sqlite."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
SERVER = INFRA / "mlflow" / "start-server.sh"


def pod_specs(node, found=None) -> list[dict]:
    """Every pod spec (a dict holding `containers`) inside a manifest."""
    found = [] if found is None else found
    if isinstance(node, dict):
        if "containers" in node:
            found.append(node)
        for value in node.values():
            pod_specs(value, found)
    elif isinstance(node, list):
        for value in node:
            pod_specs(value, found)
    return found


@pytest.mark.parametrize("manifest", ["raycluster.yaml", "rayjob.yaml"])
def test_ray_pods_get_the_mlflow_user_and_the_service_account(manifest):
    (doc,) = list(yaml.safe_load_all((INFRA / "kuberay" / manifest).read_text()))
    specs = pod_specs(doc["spec"])
    ray_pods = [s for s in specs if any(c.get("env") for c in s["containers"])]
    assert len(ray_pods) >= 2  # head and workers
    for spec in ray_pods:
        assert spec.get("serviceAccountName") == "stm-vos"
        for container in spec["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert "MLFLOW_TRACKING_URI" in env
            for name, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
                ref = env[name]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": "mlflow-auth", "key": key}


def test_the_k8s_server_runs_on_postgres_with_auth_from_secrets():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all((INFRA / "mlflow/mlflow-k8s.yaml").read_text())}
    assert ("ServiceAccount", "stm-vos") in docs and ("StatefulSet", "mlflow-postgres") in docs
    assert ("PersistentVolumeClaim", "mlflow-data") not in docs  # no sqlite volume
    deployment = docs[("Deployment", "mlflow")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://mlflow:$(MLFLOW_DB_PASSWORD)@mlflow-postgres")
    assert env["MLFLOW_REQUIRE_DATABASE"]["value"] == "1"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth",
                                                                               "key": "admin-password"}
    assert "optional" not in env["MLFLOW_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "stm-vos"


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_launcher_nodes_get_the_secret_and_bucket_access(cloud):
    config = yaml.safe_load((INFRA / f"cluster-{cloud}.yaml").read_text())
    options = " ".join(config["docker"]["run_options"])
    env_file = "/home/ubuntu/stm-secrets.env"
    assert f"--env-file {env_file}" in options and "MLFLOW_REQUIRE_DATABASE=1" in options
    (init,) = config["initialization_commands"]
    assert init.rstrip().endswith(f"> {env_file}") and "umask 077" in init
    assert ("secretsmanager get-secret-value" if cloud == "aws" else "gcloud secrets versions access") in init
    for node in config["available_node_types"].values():
        access = node["node_config"].get("IamInstanceProfile" if cloud == "aws" else "serviceAccounts")
        assert access, f"{cloud}: a node type without bucket access"
    head = config["head_start_ray_commands"]
    check = next(i for i, c in enumerate(head) if "start-server.sh --check" in c)
    start = next(i for i, c in enumerate(head) if c.startswith("nohup") and "start-server.sh" in c)
    assert check < start and "/health" in head[start + 1]


def run_server(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run(["bash", str(SERVER), "--check"], env={**base, **env}, capture_output=True, text=True)


def test_start_server_refuses_without_its_secrets(tmp_path):
    pg = "postgresql://mlflow:pw@db:5432/mlflow"
    no_password = run_server(tmp_path, MLFLOW_BACKEND_STORE_URI=pg)
    assert no_password.returncode == 2 and "MLFLOW_AUTH_ADMIN_PASSWORD is not set" in no_password.stderr
    sqlite = run_server(tmp_path, MLFLOW_REQUIRE_DATABASE="1", MLFLOW_AUTH_ADMIN_PASSWORD="x")
    assert sqlite.returncode == 2 and "MLFLOW_BACKEND_STORE_URI=postgresql://" in sqlite.stderr
    fine = run_server(tmp_path, MLFLOW_REQUIRE_DATABASE="1", MLFLOW_AUTH_ADMIN_PASSWORD="x", MLFLOW_BACKEND_STORE_URI=pg)
    assert fine.returncode == 0, fine.stderr
    assert not any(tmp_path.iterdir()), "--check must not write anything"
