"""`stm segment --videos` on phone-style files: a rotation in the display matrix is applied (masks
and overlay upright, masks given in the displayed orientation), the overlay keeps the source's
frame times (variable frame rate), large frames are bounded by --max-size and the log says so."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from stm_core.data.io import read_index_mask, write_index_mask
from stm_core.data.video_file import probe, timed_frames
from tests.test_segment_many import moving_square_video, segment, tiny_checkpoint

pytestmark = pytest.mark.slow
TIMES = [0.0, 0.05, 0.2, 0.25, 0.3, 0.6, 0.65, 0.7]  # seconds: a variable frame rate


def phone_video(path: Path, stored_hw: tuple[int, int], rotation: int) -> np.ndarray:
    """An mp4 whose stored frames are `stored_hw` and whose display matrix turns them `rotation`
    degrees counterclockwise; -> the first frame's mask as the video is displayed (H x W ids)."""
    import av

    h, w = stored_hw
    rng = np.random.default_rng(0)
    bg = (rng.random((h, w, 3)) * 120 + 40).astype(np.uint8)
    stored_mask = np.zeros((h, w), np.uint8)
    stored_mask[4:20, 6:30] = 1  # an object near the stored top-left corner: its displayed place tells the turn
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=20)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.set_display_rotation(rotation)
        for t in TIMES:
            image = bg.copy()
            image[stored_mask > 0] = (230, 40, 40)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), stream.codec_context.time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return np.ascontiguousarray(np.rot90(stored_mask, k=rotation // 90))


def test_a_rotated_phone_video_gives_upright_masks_and_an_overlay_at_its_own_times(tmp_path, ray_2cpu, capsys):
    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    shown = phone_video(videos / "phone.mp4", (48, 96), 270)  # stored 96x48, shown 48 wide, 96 tall
    assert shown.shape == (96, 48)
    write_index_mask(videos / "phone.png", shown)
    ckpt = tiny_checkpoint(tmp_path / "stm.pt")
    capsys.readouterr()
    assert segment("--checkpoint", ckpt, "--videos", videos, "--out", out, "--overlay", "--workers", 1,
                   "--max-size", 64) == 0
    err = capsys.readouterr().err
    assert "phone: 48x96 frames are segmented at 32x64 (--max-size 64)" in err
    record = json.loads((out / "segment.json").read_text())["videos"]["phone"]
    assert record["status"] == "done" and record["frames"] == len(TIMES)
    first = read_index_mask(out / "phone" / "00000.png")
    assert first.shape == (96, 48) and np.array_equal(first, shown)  # the given mask, in the displayed frame
    assert all(read_index_mask(p).shape == (96, 48) for p in (out / "phone").glob("*.png"))
    info = probe(out / "phone.mp4")
    assert (info.height, info.width) == (96, 48) and info.rotation == 0  # the overlay is upright itself
    times = [t for _, t in timed_frames(out / "phone.mp4")]
    assert times == pytest.approx(TIMES, abs=2e-3)


def test_a_truncated_file_fails_before_any_frame_is_segmented(tmp_path, ray_2cpu):
    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    mask = moving_square_video(videos / "whole.mp4", 30, 64, 96, side=20)  # its index first (faststart)
    data = (videos / "whole.mp4").read_bytes()
    (videos / "cut.mp4").write_bytes(data[: len(data) * 2 // 3])
    write_index_mask(videos / "cut.png", mask)
    ckpt = tiny_checkpoint(tmp_path / "stm.pt")
    assert segment("--checkpoint", ckpt, "--videos", videos, "--out", out, "--workers", 1,
                   "--sequences", "cut") == 1
    record = json.loads((out / "segment.json").read_text())["videos"]["cut"]
    assert record["status"] == "failed" and "truncated" in record["error"] and str(videos / "cut.mp4") in record["error"]
    assert "frames its header lists are in the file" in record["error"], record  # found by the packet count
