"""The papers' path on a one-machine cluster whose nodes have less disk than the data.

`tests/loopback.py` starts a head with 0 CPUs and two worker nodes, each in its own mount namespace
whose node-local disk (/tmp = TMPDIR, the project's caches, ~/.cache) is a 16 MB tmpfs; the store is
a loopback S3 server holding more than 48 MB, MLflow an authenticated server. Each stage's driver
runs on a worker node (inside its namespace, as a RayJob's driver pod): a stage that copies a whole
set onto a node fails there with "No space left on device".
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import loopback as lb
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ROOT = "s3://stm/run"
DISK_MB = 16
DATA_MB = 48

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500),
              pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0 or not all(map(shutil.which, ("unshare", "nsenter"))),
                                 reason="needs root, unshare(1) and nsenter(1) for the nodes' mount namespaces")]


def small_disk_params() -> dict:
    """params.yaml over the store: a STRMN set and benchmark videos each larger than a node's disk."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    src = p["download"]["sources"]
    p["download"]["sources"] = {
        "builtin-images": {**src["builtin-images"], "count": 24, "size": 192},
        "builtin-videos": {**src["builtin-videos"], "style": "easy", "height": 384, "width": 384, "frames": 12,
                           "train_sequences": 60, "val_sequences": 3},
    }
    p["download"]["keep_archives"] = False
    # PNG frames at 384 px: a set larger than a node's disk from few clips (cheap to make)
    p["synthesize"].update(sets={"strmn": {"frames": 3, "clips": 54, "sources": None, "val_clips": 4}}, height=384,
                           width=384, clips_per_shard=6, num_actors=2, val_share=0.25, image_format="png")
    p["model"].update(decoder_dim=16, fusion_dim=8)
    p["strmn"].update(pretrain_steps=4, pretrain_frames=3, batch_size=2, pretrain_lr_schedule="plateau")
    p["pretrain"].update(val_every=2, val_clips=2, plateau_patience=1, crop=64, warmup_steps=0, checkpoint_every=2,
                         log_every=2, log_images_every=0, max_failures=0, shuffle_buffer=4, materialize=None)
    p["ray"].update(num_workers=1, cpus_per_worker=1.0, data_max_actors=1, eval_actors=2)
    p["memory"].update(slots=3)
    p["evaluate"].update(variants=["copy-first", "strmn:C"], max_sequences=2, overlays=0, num_cpus=1.0,
                         dataset=f"{ROOT}/data/raw/builtin-videos", strmn_model=f"{ROOT}/models/strmn-pretrain/model.pt",
                         probe_sequences=0, max_size=128)
    p["storage"] = {"root": ROOT}
    p["mlflow"] = {"experiment": "stm-small-disks", "tracking_uri": ""}
    return p


@pytest.fixture(scope="module")
def services():
    base = Path(tempfile.mkdtemp(prefix="stms-", dir="/var/tmp"))  # short: Unix socket paths
    procs = lb.Processes(str(base))
    try:
        yield lb.start_services(procs, base)
    finally:
        procs.stop()
        left = procs.leftovers()
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"processes left running: {left}"


def new_cluster(services: lb.Services, tag: str) -> tuple[lb.Cluster, Path]:
    """A fresh cluster and a fresh project folder for its drivers (gone with it: a new RayJob)."""
    cluster = lb.start_cluster(services, services.base, workers=2, cpus=2, disk_mb=DISK_MB, tag=tag,
                               pythonpath=str(REPO))
    proj = lb.project_copy(REPO, services.base / f"{tag}-proj")
    (proj / "params-small.yaml").write_text(yaml.safe_dump(small_disk_params()))
    return cluster, proj


def stm(cluster: lb.Cluster, proj: Path, *args: str, timeout: float = 600) -> str:
    """`stm <args>` with its driver on worker node 0; -> its output, or the test fails with it."""
    t0 = time.monotonic()
    done = cluster.run_on(0, [sys.executable, "-m", "pipeline.cli", *args, "--params", "params-small.yaml"], proj,
                          timeout, PYTHONPATH=str(REPO))
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"stm {' '.join(args)} failed ({done.returncode}):\n{out[-6000:]}"
    print(f"stm {' '.join(args)}: {time.monotonic() - t0:.0f} s", flush=True)
    return out


def publish(cluster: lb.Cluster, proj: Path, folder: str, root: str = ROOT) -> None:
    code = f"from pathlib import Path; from pipeline import storage; storage.publish(Path({folder!r}), '{root}/{folder}')"
    done = cluster.run_on(0, [sys.executable, "-c", code], proj, 300, PYTHONPATH=str(REPO))
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(services):
    """download, synthesize and the STRMN plateau pretraining on a cluster whose nodes have 16 MB."""
    cluster, proj = new_cluster(services, "a")
    try:
        stm(cluster, proj, "download", "--source", "builtin-images")
        stm(cluster, proj, "download", "--source", "builtin-videos")
        stm(cluster, proj, "synthesize", "--set", "strmn")
        publish(cluster, proj, "data/raw/builtin-videos")  # the benchmark in the bucket, as a user puts it there
        sizes = services.keys("run/data/")
        total = sum(sizes.values()) / 2**20
        strmn = sum(v for k, v in sizes.items() if k.startswith("run/data/synthetic/strmn/")) / 2**20
        videos = sum(v for k, v in sizes.items() if k.startswith("run/data/raw/builtin-videos/")) / 2**20
        print(f"store: {total:.0f} MB (STRMN set {strmn:.0f} MB, videos {videos:.0f} MB); node disk {DISK_MB} MB")
        assert total >= DATA_MB and strmn > DISK_MB and videos > DISK_MB, (total, strmn, videos)
        out = stm(cluster, proj, "train", "--stage", "pretrain", "--model", "strmn")
        assert "validation loss" in out, out[-3000:]  # the plateau checks ran on the training node
        yield cluster, proj
    finally:
        cluster.stop()


def test_strmn_plateau_pretraining_and_evaluation_on_nodes_with_less_disk_than_the_data(services, trained):
    cluster, proj = trained
    assert f"{ROOT[len('s3://stm/'):]}/models/strmn-pretrain/model.pt" in services.keys("run/models/")
    stm(cluster, proj, "evaluate")
    scores = json.loads((proj / "metrics" / "evaluate.json").read_text())
    assert "copy-first" in scores and [k for k in scores if k.startswith("strmn")], scores
    assert all(0.0 <= m["JF_mean"] <= 1.0 for m in scores.values()), scores
    for node in cluster.nodes:  # the disks stayed small: nothing copied a set onto them
        assert node.disk_used() < DISK_MB * 2**20 // 2, (node.name, node.disk_used())


def test_stm_segment_of_a_store_dataset_on_nodes_with_less_disk_than_the_data(services, trained):
    cluster, proj = trained
    t0 = time.monotonic()
    done = cluster.run_on(0, [sys.executable, "-m", "pipeline.cli", "segment", "--checkpoint",
                              f"{ROOT}/models/strmn-pretrain/model.pt", "--dataset", f"{ROOT}/data/raw/builtin-videos",
                              "--out", f"{ROOT}/segment", "--workers", "2"], proj, 600, PYTHONPATH=str(REPO))
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    print(f"stm segment: {time.monotonic() - t0:.0f} s")
    assert any(k.endswith("segment.json") for k in services.keys("run/segment/"))


EVICT = "s3://stm/evict"


def evict_params() -> dict:
    """A small benchmark of its own root: three copy-first items, so the runs take seconds."""
    p = small_disk_params()
    src = p["download"]["sources"]["builtin-videos"]
    p["download"]["sources"] = {"builtin-videos": {**src, "height": 64, "width": 64, "frames": 6,
                                                   "train_sequences": 1, "val_sequences": 3}}
    p["storage"] = {"root": EVICT}
    p["evaluate"].update(variants=["copy-first"], max_sequences=0, dataset=f"{EVICT}/data/raw/builtin-videos")
    return p


def test_a_new_cluster_evaluates_only_what_a_deleted_one_left_unfinished(services):
    """Two evaluation runs share one storage.root; the cluster of the first is deleted after it failed
    on one item: the second, on a new cluster with a new working copy, evaluates only that item."""
    cluster, proj = new_cluster(services, "b")
    try:
        (proj / "params-small.yaml").write_text(yaml.safe_dump(evict_params()))
        stm(cluster, proj, "download", "--source", "builtin-videos")
        publish(cluster, proj, "data/raw/builtin-videos", EVICT)
        prefix = "evict/data/raw/builtin-videos/"
        names = services.s3_client().get_object(Bucket="stm", Key=f"{prefix}ImageSets/2017/val.txt")["Body"].read()
        broken = names.decode().split()[1]
        frame = f"{prefix}Annotations/480p/{broken}/00003.png"  # copy-first scores against it (and reads no frame)
        good = services.s3_client().get_object(Bucket="stm", Key=frame)["Body"].read()
        services.s3_client().put_object(Bucket="stm", Key=frame, Body=b"not a png")  # that item fails
        done = cluster.run_on(0, [sys.executable, "-m", "pipeline.cli", "evaluate", "--params", "params-small.yaml"],
                              proj, 600, PYTHONPATH=str(REPO))
        out = done.stdout + done.stderr
        assert done.returncode == 2 and "1 of 3 items failed" in out, out[-6000:]
        records = [k for k in services.keys("evict/results.partial/") if k.endswith("/result.json")]
        assert len(records) == 2, records  # the finished items are in the store, not on the deleted cluster
    finally:
        cluster.stop()
        shutil.rmtree(proj, ignore_errors=True)
    services.s3_client().put_object(Bucket="stm", Key=frame, Body=good)

    cluster, proj = new_cluster(services, "c")
    try:
        (proj / "params-small.yaml").write_text(yaml.safe_dump(evict_params()))
        out = stm(cluster, proj, "evaluate")
        assert "2 of 3 items finished in an earlier run" in out and "evaluating the other 1" in out, out[-6000:]
        assert not services.keys("evict/results.partial/")  # a finished stage clears its records
    finally:
        cluster.stop()
