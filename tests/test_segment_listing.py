"""The driver's listing for `stm segment` (no Ray): per-video faults, fingerprints, what a re-run redoes."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from pipeline.segment.listing import dataset_jobs, video_file_jobs
from pipeline.segment.outputs import why_redo
from pipeline.segment.tree import Tree
from stm_core.data.io import DataError, write_index_mask
from tests.test_segment_many import builtin_davis


def test_davis_and_youtube_vos_faults_are_per_video_and_fingerprints_follow_the_files(tmp_path):
    davis = tmp_path / "davis"
    names = builtin_davis(davis, videos=2, frames=3, size=16)
    split = davis / "ImageSets" / "2017" / "val.txt"
    split.write_text(split.read_text().rstrip("\n") + "\nghost\n")
    jobs, failed = dataset_jobs(Tree.scan(davis))
    assert [j.name for j in jobs] == names and "frame folder is missing" in failed["ghost"]
    assert jobs[0].fps == 24.0 and len(jobs[0].frames) == 3 and jobs[0].inputs != jobs[1].inputs
    mask = davis / "Annotations" / "480p" / names[0] / "00000.png"
    write_index_mask(mask, np.ones((16, 16), np.uint8))
    os.utime(mask, ns=(1, 1))
    again, _ = dataset_jobs(Tree.scan(davis))
    assert again[0].inputs != jobs[0].inputs and again[1].inputs == jobs[1].inputs

    yt = tmp_path / "yt" / "valid"
    for vid in ("a", "b"):
        shutil.copytree(davis / "JPEGImages" / "480p" / names[1], yt / "JPEGImages" / vid)
    shutil.copytree(davis / "Annotations" / "480p" / names[1], yt / "Annotations" / "a")
    (yt / "meta.json").write_text(json.dumps({"videos": {v: {"objects": {"1": {"frames": ["00000"]}}}
                                                         for v in ("a", "b")}}))
    jobs, failed = dataset_jobs(Tree.scan(tmp_path / "yt"), split="valid")
    assert [j.name for j in jobs] == ["a"] and jobs[0].object_frames == {1: 0} and jobs[0].fps == 30.0
    assert str(yt / "Annotations" / "b") in failed["b"] and "mask folder not found" in failed["b"]


def test_video_files_duplicate_stems_and_unnumbered_masks_fail_their_video(tmp_path):
    for name in ("good.mp4", "clip.mp4", "clip.mov", "later.mkv"):
        (tmp_path / name).write_bytes(b"x")
    write_index_mask(tmp_path / "good.png", np.ones((4, 4), np.uint8))
    write_index_mask(tmp_path / "later" / "first.png", np.ones((4, 4), np.uint8))
    jobs, failed = video_file_jobs(Tree.scan(tmp_path), ["good", "clip", "later", "missing"])
    assert [j.name for j in jobs] == ["good"] and jobs[0].annotations == {0: "good.png"}
    assert str(tmp_path / "clip.mov") in failed["clip"] and str(tmp_path / "clip.mp4") in failed["clip"]
    assert "named by frame number" in failed["later"] and "no video file named missing" in failed["missing"]
    with pytest.raises(DataError, match="input folder not found"):
        Tree.scan(tmp_path / "nope")


def test_why_redo_names_what_differs():
    key = {"checkpoint_sha256": "c1", "memory": "every:5", "overlay": False}
    record = {"settings": dict(key), "inputs": "f1"}
    assert why_redo(record, key, "f1") is None
    assert why_redo(record, {**key, "checkpoint_sha256": "c2"}, "f1") == "checkpoint_sha256"
    assert why_redo(record, key, "f2") == "inputs"
    assert why_redo(record, {**key, "overlay": True}, "f1") == "overlay"
    assert why_redo({"settings": {**key, "overlay": True}, "inputs": "f1"}, key, "f1") is None  # an overlay serves
    assert why_redo(None, key, "f1") == "not done"
