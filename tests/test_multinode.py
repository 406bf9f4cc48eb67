"""The pipeline on a real two-node Ray cluster whose nodes share no disk, on this machine.

Node 1: `ray start --head`. Node 2: `ray start --address` inside its own mount namespace
(`unshare -m`, root) where the head's Ray temp dir (and with it the job's working-dir copy) and the
project's data/models/checkpoints/results folders are empty tmpfs mounts: a stage that reads a local
path from a task on node 2 fails. Storage is a moto S3 server on loopback; MLflow is a real
`mlflow server` with its artifacts in that store. The embedded pipeline at tiny sizes runs as one
`ray job submit`: download, synthesize, pretrain and train (one worker per node, a worker on node 2
killed mid-training), evaluate (tasks on both nodes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import loopback as lb
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BUCKET = "stm-2node"
STORE = f"s3://{BUCKET}/run"
CREDS = lb.CREDS  # the loopback S3 server's credentials (tests/loopback.py)
OUTPUTS = ("data", "models", "checkpoints", "results", "metrics")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0 or shutil.which("unshare") is None,
                       reason="needs root and unshare(1) for the second node's private mount namespace"),
]


def tiny_params() -> dict:
    """params.yaml at tiny sizes, with the store and one training worker per node."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    src = p["download"]["sources"]
    p["download"]["sources"] = {
        "builtin-images": {**src["builtin-images"], "count": 24, "size": 64},
        "builtin-videos": {**src["builtin-videos"], "style": "easy", "height": 64, "width": 64, "frames": 8,
                           "train_sequences": 3, "val_sequences": 2},
    }
    p["synthesize"].update(sets={"stm": {"frames": 3, "clips": 16}}, height=64, width=64, clips_per_shard=8,
                           num_actors=2)
    p["model"].update(decoder_dim=16, fusion_dim=8)
    tiny = dict(steps=6, batch_size=2, crop=48, warmup_steps=0, checkpoint_every=2, log_every=2, log_images_every=0,
                max_failures=2, shuffle_buffer=8)
    p["pretrain"].update(tiny, steps=4)
    p["train"].update(tiny, max_skip=2)
    p["ray"].update(num_workers=2, cpus_per_worker=1.0, placement_strategy="STRICT_SPREAD")
    p["evaluate"].update(variants=["copy-first", "stm:first"], max_sequences=2, overlays=1, num_cpus=1.0)
    p["storage"] = {"root": STORE}
    p["mlflow"] = {"experiment": "stm-2node", "tracking_uri": ""}
    return p


JOB = """set -euo pipefail
P=params-2node.yaml
py() {{ {python} -m pipeline.cli "$@"; }}
py download --params $P
py synthesize --params $P --set stm
py train --stage pretrain --model stm --params $P
STM_TRAIN_FAULT="3:{marker}" py train --stage main --model stm --params $P
py evaluate --params $P
mkdir -p {out}
cp -r metrics models results {out}/
"""


def project_copy(dest: Path) -> Path:
    """The repository's files as `ray job submit --working-dir` would upload them (no venv, no outputs)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for folder in OUTPUTS:  # mount points for the second node's empty tmpfs
        (dest / folder).mkdir(exist_ok=True)
    return dest


@pytest.fixture(scope="module")
def cluster():
    base = Path(tempfile.mkdtemp(prefix="stm2n-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    procs = lb.Processes(str(base))
    env = {**os.environ, **CREDS, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DVC_ROOT", "STM_TRAIN_FAULT"):
        env.pop(key, None)
    try:
        s3 = lb.start_moto(procs, base, env)
        env.update(AWS_ENDPOINT_URL=s3, MLFLOW_S3_ENDPOINT_URL=s3)
        s3_client(s3).create_bucket(Bucket=BUCKET)
        tracking, mlflow_proc = lb.start_mlflow(procs, base, env, f"s3://{BUCKET}/mlartifacts")
        ray_head = lb.start_head(procs, base / "rh", base / "ray-head.log", cpus=2,
                                 env=env | {"STM_NODE_CACHE": str(base / "cache-head")})
        gcs, dashboard = ray_head.gcs_address, ray_head.dashboard_url
        proj = project_copy(base / "proj")
        lb.start_hidden_worker(procs, base, env | {"STM_NODE_CACHE": str(base / "rw" / "cache")}, gcs, cpus=2,
                               hide=[base / "rh", *(proj / f for f in OUTPUTS), *(REPO / f for f in OUTPUTS
                                                                                  if (REPO / f).is_dir())])
        nodes = lb.wait_nodes(dashboard, 2, 180, base / "ray-worker.log")
        lb.wait_mlflow(tracking, mlflow_proc, base)
        head = next(n["nodeId"] for n in nodes if n.get("isHeadNode"))
        second = next(n["nodeId"] for n in nodes if not n.get("isHeadNode"))
        yield {"base": base, "env": env, "s3": s3, "tracking": tracking, "gcs": gcs, "dashboard": dashboard,
               "proj": proj, "head": head, "second": second}
    finally:
        procs.stop()
        left = procs.leftovers()
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"processes left running: {left}"


def s3_client(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name=CREDS["AWS_DEFAULT_REGION"],
                        aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"])


def s3_keys(c: dict, prefix: str) -> list[str]:
    client = s3_client(c["s3"])
    keys, token = [], None
    while True:
        kw = {"Bucket": BUCKET, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = client.list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def submit(c: dict, entrypoint: str, timeout: float) -> tuple[int, str]:
    env = {**c["env"], "RAY_API_SERVER_ADDRESS": c["dashboard"]}
    # RAY_ADDRESS for the job's workers too: Ray Train's helper actors call ray.init() and must not
    # guess between this cluster and other Ray instances on a shared machine.
    runtime = {"env_vars": {"RAY_ADDRESS": c["gcs"], "MLFLOW_TRACKING_URI": c["tracking"], "AWS_ENDPOINT_URL": c["s3"],
                            "MLFLOW_S3_ENDPOINT_URL": c["s3"], **CREDS}}
    args = [str(lb.BIN / "ray"), "job", "submit", "--address", c["dashboard"], "--working-dir", str(c["proj"]),
            "--runtime-env-json", json.dumps(runtime), "--", "bash", "-c", entrypoint]
    try:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        return 124, (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else str(err.stdout)
    return done.returncode, done.stdout + done.stderr


def test_a_local_path_on_two_nodes_is_refused_before_work_starts(cluster):
    """storage.root empty on a two-node cluster: `stm train` stops with an error naming the keys."""
    c = cluster
    params = tiny_params()
    params["storage"]["root"] = ""
    (c["proj"] / "params-local.yaml").write_text(yaml.safe_dump(params))
    shards = c["proj"] / "data" / "synthetic" / "stm"
    shards.mkdir(parents=True, exist_ok=True)  # the data exists on the head: only the cluster check can stop it
    (shards / "clips-00000-0.parquet").write_bytes(b"")
    env = {**c["env"], "RAY_ADDRESS": c["gcs"], "MLFLOW_TRACKING_URI": c["tracking"]}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--stage", "pretrain", "--params",
                           "params-local.yaml"], cwd=c["proj"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pretrain.data = " in done.stderr and "ray.storage = " in done.stderr, done.stderr
    assert "2 nodes" in done.stderr and "storage.root" in done.stderr, done.stderr
    assert not (c["proj"] / "checkpoints").exists() or not any((c["proj"] / "checkpoints").iterdir())
    print(f"\nrefused in {time.monotonic() - t0:.1f} s: {done.stderr.strip().splitlines()[-1]}")


def test_pipeline_runs_on_two_nodes_sharing_no_disk(cluster):
    c = cluster
    out, marker = c["base"] / "out", c["base"] / "fault-marker"
    (c["proj"] / "params-2node.yaml").write_text(yaml.safe_dump(tiny_params()))
    t0 = time.monotonic()
    rc, log = submit(c, JOB.format(python=sys.executable, marker=marker, out=out), timeout=1500)
    elapsed = time.monotonic() - t0
    assert rc == 0, f"ray job failed ({rc}) after {elapsed:.0f} s:\n{log[-12000:]}"
    print(f"\nray job submit (download -> evaluate on 2 nodes): {elapsed:.0f} s")

    # The worker killed mid-training ran on node 2; the run resumed from the checkpoint in the store.
    assert json.loads((out / "metrics" / "train-main.json").read_text())["steps"] == 6  # DVC's three numbers
    pid, step, node = marker.read_text().split()
    assert int(step) == 3 and node == c["second"], marker.read_text()

    # Checkpoints and models are in the store, not only on the head.
    checkpoints = s3_keys(c, "run/checkpoints/")
    assert any("/pretrain-" in k and "/checkpoint_" in k for k in checkpoints), checkpoints[:20]
    assert any("/main-" in k and "/checkpoint_" in k for k in checkpoints), checkpoints[:20]
    models = s3_keys(c, "run/models/")
    for stage in ("pretrain", "main"):
        assert f"run/models/{stage}/model.pt" in models and f"run/models/{stage}/model.json" in models, models
    assert any(k.endswith("/model/MLmodel") or k.endswith("MLmodel") for k in s3_keys(c, "mlartifacts/"))
    assert s3_keys(c, "run/data/synthetic/stm/") and s3_keys(c, "run/data/raw/builtin-videos/")

    # One MLflow run per stage, with its metrics; registered model versions; evaluation linked to them.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=c["tracking"], registry_uri=c["tracking"])
    exp = client.get_experiment_by_name("stm-2node")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    by_stage: dict[str, list] = {}
    for r in (r for r in runs if r.data.tags.get("stm_role") != "variant"):
        by_stage.setdefault(r.data.tags.get("dvc_stage", "?"), []).append(r)
    assert {k: len(v) for k, v in by_stage.items()} == {"synthesize": 1, "pretrain": 1, "train": 1, "evaluate": 1}
    assert by_stage["synthesize"][0].data.metrics["stm.clips"] == 16
    for stage in ("pretrain", "train"):
        run = by_stage[stage][0]
        assert "final_loss" in run.data.metrics and "loss" in run.data.metrics, run.data.metrics
        assert set(run.data.tags["ray_nodes"].split(",")) == {c["head"], c["second"]}, run.data.tags
    assert by_stage["train"][0].data.metrics["resumed_from_step"] == 2
    summary_file = client.download_artifacts(by_stage["train"][0].info.run_id, "training_summary.json",
                                             str(c["base"]))
    main = json.loads(Path(summary_file).read_text())  # the full training summary lives in MLflow
    assert main["restarts"] >= 1 and main["resumed_from"] == 2 and main["steps"] == 6, main
    versions = client.search_model_versions("name='STM'")
    registered = [line for line in log.splitlines() if "MLflow model" in line]
    assert len(versions) == 2, ([(v.name, v.version, v.tags, v.run_id) for v in client.search_model_versions()],
                                registered)
    main_info = json.loads((out / "models" / "main" / "model.json").read_text())
    assert main_info["run_id"] == by_stage["train"][0].info.run_id
    evaluation = by_stage["evaluate"][0]
    assert evaluation.data.tags["stm_stm_model_version"] == main_info["model_uri"]
    assert evaluation.data.tags["stm_stm_train_run_id"] == main_info["run_id"]
    assert "stm-first.JF_mean" in evaluation.data.metrics, evaluation.data.metrics
    inputs = client.get_run(evaluation.info.run_id).inputs.dataset_inputs
    assert inputs and inputs[0].dataset.name == "builtin-videos/val", inputs

    # Evaluation tasks ran on both nodes.
    info = json.loads((out / "results" / "evaluation.json").read_text())
    assert set(info["nodes"]) == {c["head"], c["second"]}, info["nodes"]
