"""Palette PNG I/O, image decoding and their error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stm_core.data import (
    DAVIS_PALETTE,
    DataError,
    read_frame,
    read_image,
    read_index_mask,
    rgb_to_index_mask,
    write_image,
    write_index_mask,
)
from stm_core.data.io import decode_index_mask_png, index_mask_png


def test_palette_is_davis():
    assert DAVIS_PALETTE[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
    assert len(DAVIS_PALETTE) == 768


def test_write_read_roundtrip_is_palette_and_atomic(tmp_path):
    ids = np.zeros((5, 7), np.uint8)
    ids[1:3, 2:5] = 1
    ids[4, 6] = 3
    path = tmp_path / "sub" / "00000.png"
    write_index_mask(path, torch.from_numpy(ids))
    with Image.open(path) as im:
        assert im.mode == "P"
        assert im.getpalette()[:9] == DAVIS_PALETTE[:9]
    np.testing.assert_array_equal(read_index_mask(path), ids)
    assert [p.name for p in path.parent.iterdir()] == ["00000.png"]  # no temp files left
    assert index_mask_png(ids) == index_mask_png(ids)  # deterministic bytes
    np.testing.assert_array_equal(decode_index_mask_png(index_mask_png(ids)), ids)


def test_write_rejects_bad_ids(tmp_path):
    with pytest.raises(ValueError, match="H x W"):
        write_index_mask(tmp_path / "m.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        write_index_mask(tmp_path / "m.png", np.full((2, 2), 300))


def test_binary_L_mask_reads_as_object_one(tmp_path):
    grey = np.zeros((4, 4), np.uint8)
    grey[1:3, 1:3] = 255
    Image.fromarray(grey, mode="L").save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_index_mask(tmp_path / "m.png"), (grey > 0).astype(np.uint8))
    ids = np.array([[0, 1], [2, 0]], np.uint8)
    Image.fromarray(ids, mode="L").save(tmp_path / "ids.png")
    np.testing.assert_array_equal(read_index_mask(tmp_path / "ids.png"), ids)


def test_rgb_mask_error_names_file_and_fix(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError) as err:
        read_index_mask(tmp_path / "rgb.png")
    text = str(err.value)
    assert "rgb.png" in text and "'RGB'" in text and "palette ('P')" in text and "'L'" in text


def test_rgb_to_index_mask():
    pal = np.array(DAVIS_PALETTE).reshape(-1, 3)
    ids = np.array([[0, 1], [2, 1]])
    np.testing.assert_array_equal(rgb_to_index_mask(pal[ids]), ids)
    with pytest.raises(DataError, match="not in the palette"):
        rgb_to_index_mask(np.full((1, 1, 3), 7, np.uint8))


def test_truncated_and_unreadable_images(tmp_path):
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    write_image(tmp_path / "ok.jpg", img)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jpg: unreadable or truncated"):
        read_image(tmp_path / "cut.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"junk\.jpg: not a readable image"):
        read_image(tmp_path / "junk.jpg")
    with pytest.raises(DataError, match=r"missing\.png: mask file not found"):
        read_index_mask(tmp_path / "missing.png")


def test_read_frame_is_float_chw():
    img = np.zeros((3, 5, 3), np.uint8)
    img[..., 0] = 255
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        write_image(Path(d) / "f.png", img)
        frame = read_frame(Path(d) / "f.png")
    assert frame.shape == (3, 3, 5) and frame.dtype == torch.float32
    assert frame[0].min() == 1.0 and frame[1:].max() == 0.0
