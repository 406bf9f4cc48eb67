"""`stm segment --dataset s3://...` on a loopback S3 server (moto): each worker reads its video's
frames and masks by key, nothing copies the dataset, a mistyped URI is one clear error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import loopback as lb
import pytest

from tests.test_segment_many import builtin_davis, segment, tiny_checkpoint

pytestmark = pytest.mark.slow
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "segment-inputs"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A moto server and the environment that reaches it, set before this module's Ray starts (its
    workers inherit it); the store cache folder is this module's own."""
    import boto3

    base = tmp_path_factory.mktemp("store")
    procs = lb.Processes(str(base))
    before = dict(os.environ)
    try:
        url = lb.start_moto(procs, base, lb.clean_env(**CREDS))
        os.environ.update(CREDS, AWS_ENDPOINT_URL=url, STM_NODE_CACHE=str(base / "cache"))
        boto3.client("s3", endpoint_url=url, region_name=CREDS["AWS_DEFAULT_REGION"],
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        yield base
    finally:
        os.environ.clear()
        os.environ.update(before)
        procs.stop()


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def test_a_store_dataset_is_read_per_video_and_never_copied(store, ray_2cpu, tmp_path, capsys):
    from pipeline import storage

    names = builtin_davis(tmp_path / "davis", videos=3, frames=8)
    storage.upload_dir(tmp_path / "davis", f"s3://{BUCKET}/davis")
    ckpt = tiny_checkpoint(tmp_path / "stm.pt")
    out = tmp_path / "out"
    assert segment("--checkpoint", ckpt, "--dataset", f"s3://{BUCKET}/davis", "--out", out, "--workers", 2) == 0
    summary = json.loads((out / "segment.json").read_text())
    for name in names:
        record = summary["videos"][name]
        assert record["status"] == "done" and record["frames"] == 8, record
        assert record["source"].startswith(f"s3://{BUCKET}/davis/JPEGImages/480p/{name}")
        assert len(list((out / name).glob("*.png"))) == 8
    cache = store / "cache"
    assert not list(cache.glob("*.done"))  # no whole-folder copy on any node
    assert size_of(cache) < size_of(tmp_path / "davis")  # what stays cached is a few files, not the dataset

    # a mistyped prefix, a bucket that does not exist, an unknown scheme: one line each, before any work
    for uri, words in ((f"s3://{BUCKET}/davsi", "nothing found at this store location"),
                       ("s3://no-such-bucket-here/davis", "s3://no-such-bucket-here/davis"),
                       (f"s4://{BUCKET}/davis", "unsupported scheme")):
        capsys.readouterr()
        assert segment("--checkpoint", ckpt, "--dataset", uri, "--out", tmp_path / "o2") == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
        assert not (tmp_path / "o2").exists()
