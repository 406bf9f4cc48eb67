"""The run lock on S3 (moto's real S3 server on loopback): a conditional create lets exactly one of
racing takers win, a stale lock is taken over by one of two takers, and a holder whose lock was
taken over stops (its own process: SIGTERM, exit 143) and never deletes the new holder's lock."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pipeline.runguard import RunLock, RunLocked


@pytest.fixture()
def s3(monkeypatch):
    moto = pytest.importorskip("moto.server")
    import boto3

    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": url}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=url)
    client.create_bucket(Bucket="locks")
    for item in client.list_objects_v2(Bucket="locks").get("Contents", []):  # moto's store is per process
        client.delete_object(Bucket="locks", Key=item["Key"])
    yield client, env
    server.stop()


def race(n: int, make) -> tuple[list[RunLock], list[Exception]]:
    """n threads acquire at the same moment; -> (winners, refusals)."""
    barrier, won, refused = threading.Barrier(n), [], []

    def take() -> None:
        lock = make()
        barrier.wait()
        try:
            won.append(lock.acquire())
        except RunLocked as err:
            refused.append(err)

    threads = [threading.Thread(target=take) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


def test_one_of_racing_takers_wins_a_conditional_create(s3):
    won, refused = race(4, lambda: RunLock("s3://locks/ckpt", "main-1", "train --stage main"))
    assert len(won) == 1 and len(refused) == 3
    held = json.loads(s3[0].get_object(Bucket="locks", Key="ckpt/main-1.lock")["Body"].read())
    assert held["token"] == won[0].token
    won[0].release()
    assert "Contents" not in s3[0].list_objects_v2(Bucket="locks", Prefix="ckpt/")


def test_a_stale_lock_goes_to_one_of_two_takers(s3):
    stale = {"pid": 1, "host": "gone-host", "heartbeat": 0.0, "token": "old"}
    s3[0].put_object(Bucket="locks", Key="ckpt/main-1.lock", Body=json.dumps(stale).encode())
    won, refused = race(2, lambda: RunLock("s3://locks/ckpt", "main-1", "train --stage main"))
    assert len(won) == 1 and len(refused) == 1
    won[0].release()


def test_a_holder_whose_lock_is_taken_over_is_told_and_leaves_the_new_lock(s3):
    lost: list[str] = []
    lock = RunLock("s3://locks/ckpt", "main-1", "train", on_lost=lost.append, heartbeat_s=0.2).acquire()
    time.sleep(0.5)
    assert not lost  # its own heartbeats go through
    other = {"pid": 7, "host": "other-host", "heartbeat": time.time(), "token": "theirs"}
    s3[0].put_object(Bucket="locks", Key="ckpt/main-1.lock", Body=json.dumps(other).encode())
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost and "taken over by process 7 on other-host" in lost[0]
    lock.release()
    held = json.loads(s3[0].get_object(Bucket="locks", Key="ckpt/main-1.lock")["Body"].read())
    assert held["token"] == "theirs"


def test_a_process_that_loses_its_lock_stops(s3, tmp_path):
    """The default reaction: the process stops itself like `kill -TERM` (exit 143)."""
    client, env = s3
    script = textwrap.dedent("""
        import sys, time
        from pipeline.runguard import RunLock, check_stop, run_stoppable

        def work():
            with RunLock("s3://locks/ckpt", "main-1", "train", heartbeat_s=0.2):
                print("holding", flush=True)
                for _ in range(600):  # a training loop: checks between steps
                    time.sleep(0.1)
                    check_stop()
            return 0

        sys.exit(run_stoppable("lock test", work))
    """)
    import os

    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "holding":
            raise AssertionError((proc.stderr.read() if proc.stderr else "no output").replace("\n", " | "))
        other = {"pid": 7, "host": "other-host", "heartbeat": time.time(), "token": "theirs"}
        client.put_object(Bucket="locks", Key="ckpt/main-1.lock", Body=json.dumps(other).encode())
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    assert code == 143, err
    assert "taken over by process 7 on other-host" in err
    held = json.loads(client.get_object(Bucket="locks", Key="ckpt/main-1.lock")["Body"].read())
    assert held["token"] == "theirs"
