"""`stm segment` re-runs into the same OUT: a video is redone exactly when its inputs or settings
differ from what its record says, a failed redo leaves no older output, segment.json lists all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.segment.outputs import MARKER
from stm_core.data.io import write_index_mask
from tests.test_segment_many import moving_square_video, segment, tiny_checkpoint

pytestmark = pytest.mark.slow


def other_checkpoint(path: Path) -> Path:
    """Another untrained model of the same shape (other weights, other digest)."""
    from stm_core.model.checkpoint import save_checkpoint
    from stm_core.model.network import ModelConfig, STMNetwork

    torch.manual_seed(1)
    save_checkpoint(path, STMNetwork(ModelConfig(decoder_dim=16, norm="frozen_bn")))
    return path


def marks(out: Path, names: list[str]) -> dict[str, int]:
    """Each video's record time (a redone video gets a new one)."""
    return {n: (out / n / MARKER).stat().st_mtime_ns for n in names if (out / n / MARKER).exists()}


def summary(out: Path) -> dict:
    return json.loads((out / "segment.json").read_text())


def test_reruns_redo_exactly_the_videos_whose_inputs_or_settings_changed(tmp_path, ray_2cpu, capsys):
    videos, out = tmp_path / "videos", tmp_path / "out"
    names = ["a", "b"]
    masks = {n: moving_square_video(videos / f"{n}.mp4", 8, 64, 96, side=20) for n in names}
    for n in names:
        write_index_mask(videos / f"{n}.png", masks[n])
    ckpt = tiny_checkpoint(tmp_path / "stm.pt")
    run = ["--videos", videos, "--out", out, "--workers", 2, "--memory", "every:2"]

    assert segment("--checkpoint", ckpt, *run) == 0
    first = marks(out, names)
    assert set(first) == set(names) and not list(out.glob("*.mp4"))

    # --overlay added: both redone, each with its overlay
    capsys.readouterr()
    assert segment("--checkpoint", ckpt, *run, "--overlay") == 0
    assert "redoing 2 video(s)" in capsys.readouterr().err
    second = marks(out, names)
    assert all(second[n] > first[n] for n in names)
    assert all((out / f"{n}.mp4").stat().st_size > 0 for n in names)

    # the same again (and without --overlay: a video made with one serves): nothing redone
    assert segment("--checkpoint", ckpt, *run, "--overlay") == 0
    assert segment("--checkpoint", ckpt, *run) == 0
    assert marks(out, names) == second and summary(out)["summary"]["skipped"] == 2

    # a fixed mask: only its video is redone
    fixed = masks["a"].copy()
    fixed[:, :8] = 1
    write_index_mask(videos / "a.png", fixed)
    os.utime(videos / "a.png", ns=(1, 1))  # another mtime even on a coarse clock
    assert segment("--checkpoint", ckpt, *run, "--overlay") == 0
    third = marks(out, names)
    assert third["a"] > second["a"] and third["b"] == second["b"]
    assert summary(out)["videos"]["a"]["inputs"] != summary(out)["videos"]["b"]["inputs"]

    # another checkpoint: every video redone, its record names the new digest
    other = other_checkpoint(tmp_path / "other.pt")
    capsys.readouterr()
    assert segment("--checkpoint", other, *run, "--overlay") == 0
    assert "made by another checkpoint" in capsys.readouterr().err
    fourth = marks(out, names)
    assert all(fourth[n] > third[n] for n in names)
    digest = summary(out)["checkpoint_sha256"]
    assert all(json.loads((out / n / MARKER).read_text())["settings"]["checkpoint_sha256"] == digest for n in names)

    # a --sequences subset: segment.json still lists every video, the other one with its last record
    assert segment("--checkpoint", ckpt, *run, "--overlay", "--sequences", "b") == 0
    s = summary(out)
    assert set(s["videos"]) == {"a", "b"} and s["summary"]["done"] == 1 and s["summary"]["earlier"] == 1
    assert s["videos"]["a"]["status"] == "done" and s["videos"]["a"]["earlier_run"] is True
    assert s["videos"]["b"]["settings"]["checkpoint_sha256"] != digest

    # a redo that fails (a mask of another size): no older folder or overlay stays beside the error
    write_index_mask(videos / "b.png", np.ones((40, 40), np.uint8))
    assert segment("--checkpoint", ckpt, *run, "--overlay") == 1
    s = summary(out)
    assert s["videos"]["b"]["status"] == "failed" and "mask is 40x40" in s["videos"]["b"]["error"]
    assert not (out / "b").exists() and not (out / "b.mp4").exists()
    assert s["videos"]["a"]["status"] == "done"


def test_a_dataset_rerun_at_another_resolution_redoes_it(tmp_path, ray_2cpu):
    from tests.test_segment_many import builtin_davis

    names = builtin_davis(tmp_path / "davis", videos=2, frames=4)
    root = tmp_path / "davis"
    for sub in ("JPEGImages", "Annotations"):  # the same frames under a second resolution folder
        os.symlink(root / sub / "480p", root / sub / "Full-Resolution")
    ckpt = tiny_checkpoint(tmp_path / "stm.pt")
    out = tmp_path / "out"
    assert segment("--checkpoint", ckpt, "--dataset", root, "--out", out, "--workers", 1) == 0
    before = marks(out, names)
    assert segment("--checkpoint", ckpt, "--dataset", root, "--out", out, "--workers", 1,
                   "--resolution", "Full-Resolution") == 0
    after = marks(out, names)
    assert all(after[n] > before[n] for n in names)
    assert summary(out)["videos"][names[0]]["settings"]["resolution"] == "Full-Resolution"
