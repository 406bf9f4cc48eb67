"""infra/: every file parses and holds the fields its tool requires (launcher, KubeRay, Docker, MLflow).

The launcher configs go through Ray's own `prepare_config` + `validate_config` (what `ray up` runs
before it touches a cloud), so a schema error fails here, not at 2 a.m. on a GPU bill.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
LAUNCHER = {"aws": INFRA / "cluster-aws.yaml", "gcp": INFRA / "cluster-gcp.yaml"}
SCRIPTS = [INFRA / "mlflow" / "start-server.sh", INFRA / "run-pipeline.sh"]


def load_one(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    assert isinstance(docs[0], dict), f"{path}: top level is not a mapping"
    return docs[0]


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# ---------------------------------------------------------------- Ray cluster launcher (ray up)


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_config_required_fields(cloud):
    path = LAUNCHER[cloud]
    config = load_one(path)
    assert config["cluster_name"]
    assert config["provider"]["type"] == cloud
    assert config["provider"]["region"]
    if cloud == "gcp":
        assert config["provider"]["project_id"], f"{path}: GCP needs provider.project_id"
    assert isinstance(config["max_workers"], int) and config["max_workers"] >= 1
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for name, node_type in types.items():
        assert isinstance(node_type["resources"], dict), f"{path}: {name}.resources"
        assert node_type["node_config"], f"{path}: {name}.node_config"
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers), f"{path}: no GPU worker type"
    assert sum(t.get("min_workers", 0) for t in workers) <= config["max_workers"]


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_config_passes_rays_validation(cloud):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_one(LAUNCHER[cloud])
    prepared = prepare_config(copy.deepcopy(config))  # merges the provider's defaults.yaml, as `ray up`
    validate_config(prepared)  # ray-schema.json + head/worker consistency checks
    assert prepared["head_node_type"] == config["head_node_type"]


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_config_runs_the_project_image_with_tracking(cloud):
    config = load_one(LAUNCHER[cloud])
    docker = config["docker"]
    assert "stm-vos" in docker["image"], "the launcher must run the image built from infra/Dockerfile"
    assert docker["container_name"]
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=0.0.0.0" in head  # jobs API reachable
    assert "--address=$RAY_HEAD_IP:6379" in worker
    assert "infra/mlflow/start-server.sh" in head  # the cluster's one MLflow server
    for commands in (head, worker):
        assert "MLFLOW_TRACKING_URI" in commands
        assert "RAY_AUTH_MODE=token" in commands
    run_options = " ".join(docker["run_options"])
    assert "STM_STORAGE_ROOT=" in run_options  # the store every node reaches (and the DVC remote under it)
    # The image holds everything: no per-node pip installs of the project.
    assert not any("pip install" in c and "stm" in c for c in config.get("setup_commands", []))


# ---------------------------------------------------------------- KubeRay


# Field names of the ray.io/v1 types (KubeRay's rayjob_types.go / raycluster_types.go): a typo in a
# manifest is silently dropped by the API server, so unknown keys are errors here.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC_FIELDS = {
    "rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
    "workerGroupSpecs", "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions"}
HEAD_GROUP_FIELDS = {"rayStartParams", "template", "serviceType", "headService", "enableIngress", "resources",
                     "labels"}
WORKER_GROUP_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                       "numOfHosts", "scaleStrategy", "idleTimeoutSeconds", "suspend", "resources", "labels"}


def unknown(keys, known: set[str]) -> list[str]:
    return sorted(set(keys) - known)


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert not unknown(spec, RAYCLUSTER_SPEC_FIELDS), f"{where}: unknown RayClusterSpec keys {unknown(spec, RAYCLUSTER_SPEC_FIELDS)}"
    assert not unknown(spec["headGroupSpec"], HEAD_GROUP_FIELDS), where
    for group in spec["workerGroupSpecs"]:
        assert not unknown(group, WORKER_GROUP_FIELDS), f"{where}: {unknown(group, WORKER_GROUP_FIELDS)}"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: headGroupSpec.rayStartParams"
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    head_containers = containers(head["template"])
    assert head_containers and all("stm-vos" in c["image"] for c in head_containers), where
    assert "MLFLOW_TRACKING_URI" in env_of(head_containers[0])
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no workerGroupSpecs"
    for group in groups:
        assert group["groupName"]
        assert isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in containers(group["template"]):
            assert "stm-vos" in c["image"], f"{where}: worker image"
            limits = c["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{where}: worker without a GPU limit"
            assert "MLFLOW_TRACKING_URI" in env_of(c)
    version = spec.get("rayVersion", "")
    assert re.fullmatch(r"2\.\d+\.\d+", version), f"{where}: rayVersion {version!r}"
    assert spec.get("authOptions", {}).get("mode") == "token"


def test_raycluster_manifest():
    path = INFRA / "kuberay" / "raycluster.yaml"
    doc = load_one(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    check_ray_cluster_spec(doc["spec"], str(path))


def test_rayjob_manifest_runs_dvc_repro_and_cleans_up():
    path = INFRA / "kuberay" / "rayjob.yaml"
    doc = load_one(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert not unknown(spec, RAYJOB_SPEC_FIELDS), f"{path}: unknown RayJobSpec keys {unknown(spec, RAYJOB_SPEC_FIELDS)}"
    assert spec["shutdownAfterJobFinishes"] is True
    entrypoint = spec["entrypoint"]
    assert "infra/run-pipeline.sh" in entrypoint  # which runs `dvc repro`
    assert "dvc repro" in (INFRA / "run-pipeline.sh").read_text()
    shlex.split(entrypoint)  # a well-formed shell command line
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict), f"{path}: runtimeEnvYAML is not a mapping"
    env_vars = runtime_env["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values()), "runtime env values must be strings"
    assert env_vars["MLFLOW_TRACKING_URI"].startswith("http")
    assert env_vars["STM_STORAGE_ROOT"]
    assert env_vars["STM_PARAMS"].endswith(".yaml")
    assert "RAY_ADDRESS" not in env_vars  # Ray sets it for the entrypoint
    check_ray_cluster_spec(spec["rayClusterSpec"], f"{path}: rayClusterSpec")


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_on_ray_gpu_with_pinned_torch():
    text = (INFRA / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    froms = [line for line in lines if line.upper().startswith("FROM ")]
    assert len(froms) == 1 and froms[0].split()[1].startswith("rayproject/ray:"), froms
    assert froms[0].endswith("-gpu")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    assert re.fullmatch(r"2\.\d+\.\d+", args["RAY_VERSION"])
    # Every pip install goes through the repo's constraints file (torch + torchvision as a matched pair).
    code = "\n".join(line for line in text.splitlines() if not line.strip().startswith("#"))
    installs = [m.group(1).replace("\\\n", " ").split() for m in re.finditer(r"pip install([^;&|]*)", code)]
    assert installs, "no pip install in the Dockerfile"
    for args in installs:
        assert ["-c", "constraints.txt"] == args[:2], f"pip install without the constraints file: {args}"
    assert any("." in args for args in installs), "the project itself is not installed"
    constraints = (REPO / "constraints.txt").read_text()
    assert re.search(r"^torch==\S+", constraints, flags=re.M)
    assert re.search(r"^torchvision==\S+", constraints, flags=re.M)
    assert "WORKDIR /home/ray/stm" in text  # the path the launcher and KubeRay entrypoints use


def test_dockerignore_keeps_outputs_out_of_the_image():
    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    for output in ("data/", "models/", "mlflow.db", ".venv/"):
        assert output in ignored
    assert ".git" not in ignored and ".git/" not in ignored  # DVC needs the git repo


# ---------------------------------------------------------------- MLflow server


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    assert script.read_text().startswith("#!/usr/bin/env bash")
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_start_server_builds_the_mlflow_command(tmp_path):
    script = INFRA / "mlflow" / "start-server.sh"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "MLFLOW_BACKEND_STORE_URI": "postgresql://u:p@db:5432/mlflow",
           "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/mlflow"}
    out = subprocess.run(["bash", str(script), "--dry-run"], env=env, capture_output=True, text=True, check=True)
    argv = shlex.split(out.stdout)
    assert argv[:2] == ["mlflow", "server"]
    options: dict[str, str | None] = {}
    for i, token in enumerate(argv[2:], start=2):
        if token.startswith("--"):
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
            options[token] = value
    assert options["--backend-store-uri"] == "postgresql://u:p@db:5432/mlflow"
    assert options["--artifacts-destination"] == "s3://bucket/mlflow"
    assert options["--host"] == "0.0.0.0" and options["--port"] == "5000"
    assert "--serve-artifacts" in options  # clients upload through the server: no bucket keys on workers
    assert not any(tmp_path.iterdir()), "a dry run must not create directories"

    default = subprocess.run(["bash", str(script), "--dry-run"], env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                             capture_output=True, text=True, check=True)
    assert f"sqlite:///{tmp_path}/mlflow-server/mlflow.db" in default.stdout

    bad = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True,
                         env={**env, "MLFLOW_BACKEND_STORE_URI": "mlflow.db"})
    assert bad.returncode == 2 and "MLFLOW_BACKEND_STORE_URI" in bad.stderr


def test_mlflow_k8s_deployment_and_service():
    path = INFRA / "mlflow" / "mlflow-k8s.yaml"
    docs = {d["kind"]: d for d in load_all(path)}
    assert {"Deployment", "Service"} <= set(docs)
    deployment, service = docs["Deployment"], docs["Service"]
    assert deployment["apiVersion"] == "apps/v1" and service["apiVersion"] == "v1"
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod = deployment["spec"]["template"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = containers(pod)
    assert "infra/mlflow/start-server.sh" in " ".join(container["command"])
    port = container["ports"][0]
    assert port["containerPort"] == 5000
    assert service["spec"]["ports"][0]["port"] == 5000
    assert service["spec"]["ports"][0]["targetPort"] in (port["name"], 5000)
    names = {e["name"] for e in container["env"]}
    assert {"MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"} <= names
    # Ray pods reach it by the Service name.
    service_url = f"http://{service['metadata']['name']}:5000"
    for manifest in ("raycluster.yaml", "rayjob.yaml"):
        assert service_url in (INFRA / "kuberay" / manifest).read_text()
    if "PersistentVolumeClaim" in docs:
        claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert any(v.get("persistentVolumeClaim", {}).get("claimName") == claim for v in volumes.values())


def test_stage_order_runs_dependencies_first(tmp_path):
    """dvc.yaml lists evaluate first; the cluster job needs dependency order (and a stage's upstream)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  last: {cmd: cat b > c, deps: [b], outs: [c]}\n"
        "  first: {cmd: echo > a, outs: [a]}\n"
        "  middle: {cmd: cat a > b, deps: [a], outs: [b]}\n"
        "  other: {cmd: echo > o, outs: [o]}\n")
    order = subprocess.run([sys.executable, str(INFRA / "dvc_stages.py"), "order"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    assert sorted(order) == ["first", "last", "middle", "other"]
    assert order.index("first") < order.index("middle") < order.index("last")
    some = subprocess.run([sys.executable, str(INFRA / "dvc_stages.py"), "order", "middle"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=True).stdout.split()
    assert some == ["first", "middle"]
    bad = subprocess.run([sys.executable, str(INFRA / "dvc_stages.py"), "order", "nope"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no stage 'nope'" in bad.stderr


def test_cluster_remote_is_named_in_the_dvc_config():
    config = (REPO / ".dvc" / "config").read_text()
    assert "['remote \"cluster\"']" in config and "url = s3://" in config


def test_run_pipeline_refuses_a_missing_params_file(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    result = subprocess.run(["bash", str(INFRA / "run-pipeline.sh"), "params-nope.yaml"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "params-nope.yaml" in result.stderr


def test_infra_readme_documents_every_file():
    text = (INFRA / "README.md").read_text()
    for name in ("cluster-aws.yaml", "cluster-gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
                 "Dockerfile", "mlflow/start-server.sh", "mlflow/mlflow-k8s.yaml", "run-pipeline.sh",
                 "dvc_stages.py"):
        assert name in text, f"infra/README.md does not mention {name}"
    for command in ("ray up infra/cluster-aws.yaml", "ray job submit", "--working-dir .",
                    "kubectl apply -f infra/kuberay/rayjob.yaml", "MLFLOW_TRACKING_URI"):
        assert command in text
