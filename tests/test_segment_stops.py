"""`stm segment` stopped and hurt: Ctrl-C ends it cleanly with segment.json written; an actor killed
mid-video is replaced and the video completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipeline.segment.outputs import MARKER
from stm_core.data.io import write_index_mask
from tests.test_segment_many import REPO, builtin_davis, moving_square_video, segment, tiny_checkpoint

pytestmark = pytest.mark.slow


def test_ctrl_c_marks_the_interrupted_videos_and_exits_130(tmp_path, ray_2cpu):
    import ray

    names = builtin_davis(tmp_path / "davis", videos=4, frames=16)
    ckpt = tiny_checkpoint(tmp_path / "stm.pt")
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "OMP_NUM_THREADS": "1"}
    # the run joins this test's Ray (a cluster to it: store URIs, file:// on this machine)
    cmd = [sys.executable, "-m", "pipeline.cli", "segment", "--checkpoint", str(ckpt), "--dataset",
           (tmp_path / "davis").as_uri(), "--out", out.as_uri(), "--workers", "1"]
    log = tmp_path / "run.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=sink, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any((out / n / MARKER).is_file() for n in names):
                break
            time.sleep(0.1)
        assert proc.poll() is None, log.read_text()[-3000:]
        os.kill(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    summary = json.loads((out / "segment.json").read_text())
    statuses = [summary["videos"][n]["status"] for n in names]
    assert "done" in statuses and "interrupted" in statuses, statuses
    assert summary["summary"]["interrupted"] == statuses.count("interrupted")
    assert all(s in ("done", "interrupted") for s in statuses)
    for n in names:  # an interrupted video left no folder (complete or absent)
        assert (out / n / MARKER).is_file() == (summary["videos"][n]["status"] == "done")


def test_an_actor_killed_mid_video_is_replaced_and_the_video_completes(tmp_path, ray_2cpu, capsys):
    import psutil

    videos = tmp_path / "videos"
    write_index_mask(videos / "clip.png", moving_square_video(videos / "clip.mp4", 60, 64, 96, side=20))
    ckpt = tiny_checkpoint(tmp_path / "stm.pt")
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_when_midway() -> None:  # the actor that is writing clip's masks: SIGKILL, as the OOM killer does
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            staged = [p for p in out.glob(".tmp-clip-*") if p.is_dir()] if out.is_dir() else []
            if staged and len(list(staged[0].glob("*.png"))) >= 5:
                for proc in psutil.Process().children(recursive=True):  # this test's Ray only
                    try:
                        if proc.cmdline() and proc.cmdline()[0].startswith("ray::SegmentWorker"):
                            killed.append(proc.pid)
                            proc.kill()
                    except psutil.Error:
                        pass
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_when_midway, daemon=True)
    watcher.start()
    code = segment("--checkpoint", ckpt, "--videos", videos, "--out", out, "--workers", 1)
    watcher.join(timeout=5)
    err = capsys.readouterr().err
    assert killed, "the actor was never seen midway"
    assert code == 0, err[-3000:]
    assert "a worker died running clip" in err
    record = json.loads((out / "segment.json").read_text())["videos"]["clip"]
    assert record["status"] == "done" and record["frames"] == 60, record
    assert record["worker_pid"] not in killed
    assert len(list((out / "clip").glob("*.png"))) == 60
