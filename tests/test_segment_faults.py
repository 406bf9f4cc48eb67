"""`stm segment`: each fault of one video's inputs fails that video only (named in segment.json and
the log), the others complete, and the run exits 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stm_core.data.io import write_index_mask
from tests.test_segment_many import builtin_davis, moving_square_video, segment, tiny_checkpoint

pytestmark = pytest.mark.slow


def run_and_read(capsys, *args) -> tuple[int, dict, str]:
    capsys.readouterr()
    code = segment(*args)
    out = Path(args[args.index("--out") + 1])
    return code, json.loads((out / "segment.json").read_text())["videos"], capsys.readouterr().err


def expect_failed(records: dict, err: str, name: str, path: Path, words: str) -> None:
    assert records[name]["status"] == "failed", records[name]
    assert str(path) in records[name]["error"] and words in records[name]["error"], records[name]
    assert f"{name} failed" in err and str(path) in err


def test_dataset_faults_fail_their_video_only(tmp_path, ray_2cpu, capsys):
    ckpt = tiny_checkpoint(tmp_path / "stm.pt")
    # DAVIS: a sequence listed in the split without a frame folder; a mask with no matching frame
    davis = tmp_path / "davis"
    names = builtin_davis(davis, videos=2, frames=4)
    split = davis / "ImageSets" / "2017" / "val.txt"
    split.write_text(split.read_text().rstrip("\n") + "\nghost\n")
    stray = davis / "Annotations" / "480p" / names[1] / "00099.png"
    shutil.copy(stray.parent / "00000.png", stray)
    code, records, err = run_and_read(capsys, "--checkpoint", ckpt, "--dataset", davis, "--out", tmp_path / "o1",
                                      "--workers", 1)
    assert code == 1
    assert records[names[0]]["status"] == "done" and records[names[0]]["frames"] == 4
    expect_failed(records, err, "ghost", davis / "JPEGImages" / "480p" / "ghost", "frame folder is missing")
    expect_failed(records, err, names[1], stray, "no frame 00099")

    # YouTube-VOS: a video without its Annotations/ folder
    yt = tmp_path / "ytvos" / "valid"
    meta = {"videos": {}}
    for vid in ("v1", "v2"):
        shutil.copytree(davis / "JPEGImages" / "480p" / names[0], yt / "JPEGImages" / vid)
        meta["videos"][vid] = {"objects": {"1": {"frames": ["00000"]}}}
    (yt / "Annotations" / "v1").mkdir(parents=True)
    shutil.copy(davis / "Annotations" / "480p" / names[0] / "00000.png", yt / "Annotations" / "v1" / "00000.png")
    (yt / "meta.json").write_text(json.dumps(meta))
    code, records, err = run_and_read(capsys, "--checkpoint", ckpt, "--dataset", tmp_path / "ytvos", "--split",
                                      "valid", "--out", tmp_path / "o2", "--workers", 1)
    assert code == 1 and records["v1"]["status"] == "done"
    expect_failed(records, err, "v2", yt / "Annotations" / "v2", "mask folder not found")


def test_video_file_faults_fail_their_video_only(tmp_path, ray_2cpu, capsys):
    ckpt = tiny_checkpoint(tmp_path / "stm.pt")
    videos = tmp_path / "videos"
    mask = moving_square_video(videos / "good.mp4", 8, 64, 96, side=20)
    write_index_mask(videos / "good.png", mask)
    moving_square_video(videos / "clip.mp4", 8, 64, 96, side=20)  # clip.mp4 and clip.mov: one stem
    shutil.copy(videos / "clip.mp4", videos / "clip.mov")
    write_index_mask(videos / "clip.png", mask)
    moving_square_video(videos / "later.mp4", 8, 64, 96, side=20)  # a mask in later/ not named by a number
    write_index_mask(videos / "later" / "00000.png", mask)
    Image.fromarray(np.zeros((64, 96), np.uint8)).save(videos / "later" / "first.png")
    code, records, err = run_and_read(capsys, "--checkpoint", ckpt, "--videos", videos, "--out", tmp_path / "out",
                                      "--workers", 1)
    assert code == 1
    assert records["good"]["status"] == "done" and records["good"]["frames"] == 8
    expect_failed(records, err, "clip", videos / "clip.mov", "2 videos named 'clip'")
    assert str(videos / "clip.mp4") in records["clip"]["error"]
    expect_failed(records, err, "later", videos / "later" / "first.png", "named by frame number")
    assert not (tmp_path / "out" / "clip").exists() and not (tmp_path / "out" / "later").exists()
