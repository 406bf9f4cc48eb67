"""`stm segment --dataset/--videos`: many videos on a pool of Ray actors, resumable, per-video errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.segment.outputs import MARKER  # a complete video's record
from stm_core.data.builtin_videos import BuiltinVideosConfig, write_builtin_videos
from stm_core.data.io import read_index_mask, write_index_mask
from stm_core.data.video_file import write_video

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tiny_checkpoint(path: Path, kind: str = "stm") -> Path:
    """An untrained ResNet-18 model with a small decoder: masks depend on its weights, cheaply."""
    from stm_core.model.checkpoint import save_checkpoint
    from stm_core.model.network import ModelConfig, STMNetwork

    torch.manual_seed(0)
    config = ModelConfig(kind=kind, decoder_dim=16, fusion_dim=8, norm="frozen_bn") if kind == "strmn" else ModelConfig(decoder_dim=16, norm="frozen_bn")
    save_checkpoint(path, STMNetwork(config))
    return path


def builtin_davis(root: Path, videos: int, frames: int, size: int = 64) -> list[str]:
    cfg = BuiltinVideosConfig(height=size, width=size, frames=frames, train_sequences=0, val_sequences=videos,
                              style="easy")
    return [s["sequence"] for s in write_builtin_videos(root, cfg, seed=3)]


def moving_square_video(path: Path, frames: int, height: int, width: int, side: int = 60) -> np.ndarray:
    """An .mp4 of a red square crossing a textured background; -> its first-frame mask (H x W ids)."""
    rng = np.random.default_rng(0)
    bg = (rng.random((height, width, 3)) * 120 + 40).astype(np.uint8)

    def square(t: int) -> tuple[int, int]:
        return 20 + (7 * t) % (width - side - 40), 20 + (3 * t) % (height - side - 40)

    def images():
        for t in range(frames):
            image = bg.copy()
            x, y = square(t)
            image[y:y + side, x:x + side] = (230, 40, 40)
            yield image

    write_video(path, images())
    mask = np.zeros((height, width), np.uint8)
    x, y = square(0)
    mask[y:y + side, x:x + side] = 1
    return mask


def segment(*args: str) -> int:
    from pipeline.cli import main

    return main(["segment", *map(str, args)])


@pytest.fixture()
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_two_workers_give_the_single_video_masks(tmp_path, ray_2cpu, one_thread):
    """A DAVIS folder on 2 actors = the one-video form per video, with the same settings (one thread
    each; at most near-tie pixels may differ); segment.json holds each video's statistics."""
    from pipeline.segment.listing import dataset_jobs
    from pipeline.segment.sources import load_given
    from pipeline.segment.tree import Inputs, Tree

    names = builtin_davis(tmp_path / "davis", videos=4, frames=8)
    ckpt = tiny_checkpoint(tmp_path / "stm.pt")
    out = tmp_path / "out"
    assert segment("--checkpoint", ckpt, "--dataset", tmp_path / "davis", "--out", out, "--workers", 2,
                   "--memory", "every:2", "--overlay") == 0
    summary = json.loads((out / "segment.json").read_text())
    assert summary["memory"] == "every:2" and summary["precision"] == "fp32" and summary["checkpoint"] == str(ckpt)
    assert summary["summary"]["done"] == 4 and summary["summary"]["failed"] == 0
    pids = {summary["videos"][n]["worker_pid"] for n in names}
    assert len(pids) == 2  # both actors took videos
    jobs = {j.name: j for j in dataset_jobs(Tree.scan(tmp_path / "davis"))[0]}
    differ = total = 0
    for name in names:
        record = summary["videos"][name]
        assert record["frames"] == 8 and record["objects"] >= 1 and record["fps"] > 0
        assert record["memory_entries"] >= 2 and record["peak_memory_mb"] >= 0
        assert (out / f"{name}.mp4").stat().st_size > 0
        # the one-video form, fed the same starting masks (the objects each annotated frame introduces)
        given, _ = load_given(jobs[name], Inputs(str(tmp_path / "davis")), (64, 64))
        masks = tmp_path / "given" / name
        for t, ids in given.items():
            write_index_mask(masks / f"{t:05d}.png", ids.numpy())
        single = tmp_path / "single" / name
        assert segment("--checkpoint", ckpt, "--frames", tmp_path / "davis" / "JPEGImages" / "480p" / name,
                       "--masks", masks, "--out", single, "--memory", "every:2") == 0
        for t in range(8):
            a, b = read_index_mask(out / name / f"{t:05d}.png"), read_index_mask(single / f"{t:05d}.png")
            differ += int((a != b).sum())
            total += a.size
    assert differ <= 0.002 * total, f"{differ} of {total} pixels differ"


def test_a_killed_run_resumes_without_redoing_complete_videos(tmp_path, ray_2cpu, capsys):
    names = builtin_davis(tmp_path / "davis", videos=5, frames=16)
    ckpt = tiny_checkpoint(tmp_path / "stm.pt")
    out = tmp_path / "out"
    import ray

    # The run joins this test's Ray instance: killing its driver is the kill of a `stm segment` process.
    # A run against a cluster takes store URIs (its nodes share no disk): file:// on this machine.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", "segment", "--checkpoint", str(ckpt), "--dataset",
           (tmp_path / "davis").as_uri(), "--out", out.as_uri(), "--workers", "1"]
    log = tmp_path / "killed-run.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=sink, start_new_session=True)

    def finished() -> list[str]:  # a video's record is written after all of its frames
        return [n for n in names if (out / n / MARKER).is_file()]

    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(finished()) >= 2:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:  # a run that ended by itself is reported below, with its log
            os.kill(proc.pid, signal.SIGKILL)  # the real kill: no clean-up code runs; Ray drops its actor
        proc.wait(timeout=30)
    complete = finished()
    assert complete, log.read_text()[-3000:]
    assert 2 <= len(complete) < len(names), "the run should have been killed midway"
    before = {n: (out / n / MARKER).stat().st_mtime_ns for n in complete}
    assert all(len(list((out / n).glob("*.png"))) == 16 for n in complete)  # complete or absent

    capsys.readouterr()
    assert segment("--checkpoint", ckpt, "--dataset", tmp_path / "davis", "--out", out, "--workers", 2) == 0
    err = capsys.readouterr().err
    assert f"skipping {len(complete)} complete video(s)" in err
    assert {n: (out / n / MARKER).stat().st_mtime_ns for n in complete} == before  # not redone
    summary = json.loads((out / "segment.json").read_text())["summary"]
    assert summary == {**summary, "videos": 5, "skipped": len(complete), "done": 5 - len(complete), "failed": 0}
    assert all(len(list((out / n).glob("*.png"))) == 16 for n in names)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]  # the killed run's temp folder is gone
    # --force redoes a complete one
    assert segment("--checkpoint", ckpt, "--dataset", tmp_path / "davis", "--out", out, "--force",
                   "--sequences", complete[0]) == 0
    assert json.loads((out / "segment.json").read_text())["summary"]["done"] == 1
    assert (out / complete[0] / MARKER).stat().st_mtime_ns > before[complete[0]]


def test_a_long_video_with_a_bounded_memory_keeps_resident_memory_flat(tmp_path, ray_2cpu):
    """2,000 frames of 854x480 with recurrent:5:C: RSS at 2,000 frames within 10% of RSS at 500."""
    videos = tmp_path / "videos"
    mask = moving_square_video(videos / "long.mp4", 2000, 480, 854)
    write_index_mask(videos / "long.png", mask)
    ckpt = tiny_checkpoint(tmp_path / "strmn.pt", "strmn")
    out = tmp_path / "out"
    assert segment("--checkpoint", ckpt, "--videos", videos, "--out", out, "--memory", "recurrent:5:C",
                   "--max-size", 96) == 0
    record = json.loads((out / "segment.json").read_text())["videos"]["long"]
    assert record["frames"] == 2000 and record["memory_entries"] == 5
    rss = record["rss_mb"]
    assert abs(rss["2000"] - rss["500"]) <= 0.10 * rss["500"], rss
    assert len(list((out / "long").glob("*.png"))) == 2000
    assert read_index_mask(out / "long" / "01999.png").shape == (480, 854)


def test_an_unbounded_memory_warns_once_and_suggests_a_bounded_one(tmp_path, ray_2cpu, capsys):
    videos = tmp_path / "videos"
    write_index_mask(videos / "clip.png", moving_square_video(videos / "clip.mp4", 60, 96, 160, side=30))
    ckpt = tiny_checkpoint(tmp_path / "stm.pt")
    assert segment("--checkpoint", ckpt, "--videos", videos, "--out", tmp_path / "out", "--memory", "every:1",
                   "--warn-memory-mb", 0.05) == 0
    record = json.loads((tmp_path / "out" / "segment.json").read_text())["videos"]["clip"]
    assert len(record["warnings"]) == 1
    assert "every:1" in record["warnings"][0] and "recurrent:5:C" in record["warnings"][0]


def test_bad_videos_are_named_and_the_others_complete(tmp_path, ray_2cpu, capsys):
    videos = tmp_path / "videos"
    mask = moving_square_video(videos / "good.mp4", 12, 64, 96, side=20)
    write_index_mask(videos / "good.png", mask)
    moving_square_video(videos / "nomask.mp4", 12, 64, 96, side=20)  # no nomask.png, no nomask/
    (videos / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    write_index_mask(videos / "corrupt.png", mask)
    data = (videos / "good.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 2])  # a download cut short
    write_index_mask(videos / "truncated.png", mask)
    moving_square_video(videos / "othersize.mp4", 12, 64, 96, side=20)
    write_index_mask(videos / "othersize.png", np.zeros((48, 48), np.uint8) + 1)
    ckpt = tiny_checkpoint(tmp_path / "stm.pt")
    out = tmp_path / "out"
    capsys.readouterr()
    assert segment("--checkpoint", ckpt, "--videos", videos, "--out", out, "--workers", 2) == 1
    err = capsys.readouterr().err
    summary = json.loads((out / "segment.json").read_text())
    records = summary["videos"]
    assert records["good"]["status"] == "done" and len(list((out / "good").glob("*.png"))) == 12
    expect = {"nomask": (videos / "nomask.png", "no first-frame mask"),
              "corrupt": (videos / "corrupt.mp4", "not a readable video"),
              "truncated": (videos / "truncated.mp4", "truncated"),
              "othersize": (videos / "othersize.png", "mask is 48x48")}
    for name, (path, words) in expect.items():
        assert records[name]["status"] == "failed", name
        assert str(path) in records[name]["error"] and words in records[name]["error"], records[name]
        assert str(path) in err, name  # the log names it too
        assert not (out / name).exists()  # nothing half-written
    assert summary["summary"]["failed"] == 4 and summary["summary"]["done"] == 1
