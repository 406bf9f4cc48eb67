"""Video and image-set readers over DAVIS, YouTube-VOS and folder layouts, and every validation error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stm_core.data import (
    DataError,
    StaticImageSet,
    read_davis,
    read_frame_folder,
    read_youtube_vos,
    validate_sequence,
    validate_videos,
    write_image,
    write_index_mask,
)


def test_davis_sample_readers(davis_sample):
    videos = {v.name: v for v in read_davis(davis_sample, split=None)}
    assert set(videos) == {"bike", "car-shadow", "judo"}
    car, bike, judo = videos["car-shadow"], videos["bike"], videos["judo"]
    assert len(car) == 40 and car.dense and car.first_frames() == {1: 0}
    assert bike.annotated == [0] and bike.first_frames() == {1: 0, 2: 0}
    assert judo.annotated == [0, 5, 8, 13]
    assert judo.first_frames() == {1: 0, 2: 5, 3: 8, 4: 13}  # objects appear mid-video
    frame = car.load_frame(3)
    assert frame.shape == (3, 480, 854) and 0.0 <= float(frame.min()) and float(frame.max()) <= 1.0
    assert car.load_image(3).dtype == np.uint8
    assert car.load_mask_tensor(3).shape == (480, 854)
    assert judo.load_mask(1) is None
    # judo/00005.png is 853 px wide for 854 px frames: resized within tolerance, reported as a warning
    assert judo.load_mask(5).shape == (480, 854)
    warnings = validate_videos(list(videos.values()))
    assert len(warnings) == 1 and "judo/00005.png" in warnings[0]


def _video(root: Path, n: int = 4, size=(24, 32), masks=None, name="seq") -> Path:
    frames, anns = root / "JPEGImages" / "480p" / name, root / "Annotations" / "480p" / name
    rng = np.random.default_rng(0)
    for t in range(n):
        write_image(frames / f"{t:05d}.jpg", (rng.random((*size, 3)) * 255).astype(np.uint8))
        if masks is None or t in masks:
            ids = np.zeros(size, np.uint8)
            ids[2 + t: 8 + t, 3:9] = 1
            write_index_mask(anns / f"{t:05d}.png", ids)
    return root


def test_davis_split_files(tmp_path):
    _video(tmp_path, name="a")
    _video(tmp_path, name="b")
    (tmp_path / "ImageSets" / "2017").mkdir(parents=True)
    (tmp_path / "ImageSets" / "2017" / "val.txt").write_text("b\n")
    assert [v.name for v in read_davis(tmp_path, "val")] == ["b"]
    (tmp_path / "ImageSets" / "2017" / "train.txt").write_text("a\nzzz\n")
    with pytest.raises(DataError, match="zzz"):
        read_davis(tmp_path, "train")
    # DAVIS-2016 style: ImageSets/480p/<split>.txt of path pairs
    (tmp_path / "ImageSets" / "480p").mkdir()
    (tmp_path / "ImageSets" / "480p" / "trainval.txt").write_text(
        "/JPEGImages/480p/a/00000.jpg /Annotations/480p/a/00000.png\n")
    assert [v.name for v in read_davis(tmp_path, "trainval", year="2016")] == ["a"]


def test_validation_passes_on_a_clean_video(tmp_path):
    (seq,) = read_davis(_video(tmp_path), split=None)
    assert validate_sequence(seq) == []


def test_truncated_frame(tmp_path):
    root = _video(tmp_path)
    f = root / "JPEGImages/480p/seq/00002.jpg"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DataError, match=r"00002\.jpg: unreadable or truncated"):
        validate_sequence(read_davis(root, split=None)[0])


def test_rgb_mask_in_a_video(tmp_path):
    root = _video(tmp_path)
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(root / "Annotations/480p/seq/00001.png")
    with pytest.raises(DataError, match=r"00001\.png: mask has mode 'RGB'.*palette"):
        validate_sequence(read_davis(root, split=None)[0])


def test_mask_size_mismatch(tmp_path):
    root = _video(tmp_path)
    write_index_mask(root / "Annotations/480p/seq/00001.png", np.ones((24, 20), np.uint8))
    with pytest.raises(DataError, match=r"00001\.png: mask is 20x24 but frame .*00001\.jpg is 32x24"):
        validate_sequence(read_davis(root, split=None)[0])


def test_frame_size_mismatch(tmp_path):
    root = _video(tmp_path)
    write_image(root / "JPEGImages/480p/seq/00003.jpg", np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(DataError, match=r"00003\.jpg: frame is 10x10 but 00000\.jpg is 32x24"):
        validate_sequence(read_davis(root, split=None)[0])


def test_missing_frames(tmp_path):
    root = _video(tmp_path, n=5)
    (root / "JPEGImages/480p/seq/00002.jpg").unlink()
    (root / "Annotations/480p/seq/00002.png").unlink()
    with pytest.raises(DataError, match=r"frame number 2 is missing between 00001\.jpg and 00003\.jpg"):
        validate_sequence(read_davis(root, split=None)[0])
    (root / "JPEGImages/480p/seq/00004.jpg").unlink()  # its annotation stays
    with pytest.raises(DataError, match=r"00004\.png: annotation has no frame"):
        read_davis(root, split=None)


def test_stride_numbering_is_fine(tmp_path):
    folder = tmp_path / "frames"
    for t in (0, 5, 10, 15):
        write_image(folder / f"{t:05d}.jpg", np.zeros((8, 8, 3), np.uint8))
    validate_sequence(read_frame_folder(folder))


def test_empty_first_annotation(tmp_path):
    root = _video(tmp_path)
    write_index_mask(root / "Annotations/480p/seq/00000.png", np.zeros((24, 32), np.uint8))
    with pytest.raises(DataError, match=r"00000\.png: the first annotated frame .* holds no object"):
        validate_sequence(read_davis(root, split=None)[0])


def test_object_id_that_changes_meaning(tmp_path):
    root = _video(tmp_path)
    ids = np.zeros((24, 32), np.uint8)
    ids[4:10, 3:9] = 2  # object 1 of frame 1 is now called 2, same place
    write_index_mask(root / "Annotations/480p/seq/00002.png", ids)
    with pytest.raises(DataError, match=r"00002\.png: object id 1 vanishes and id 2 appears in its place"):
        validate_sequence(read_davis(root, split=None)[0])


def test_new_object_elsewhere_is_fine(tmp_path):
    root = _video(tmp_path)
    ids = np.zeros((24, 32), np.uint8)
    ids[4:10, 3:9] = 1
    ids[15:20, 20:30] = 2
    write_index_mask(root / "Annotations/480p/seq/00002.png", ids)
    validate_sequence(read_davis(root, split=None)[0])


def test_youtube_vos_layout(tmp_path):
    base = tmp_path / "valid"
    for t in (0, 5, 10, 15):
        write_image(base / "JPEGImages" / "v1" / f"{t:05d}.jpg", np.zeros((16, 16, 3), np.uint8))
    first, later = np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8)
    first[2:6, 2:6] = 1
    later[8:12, 8:12] = 2
    write_index_mask(base / "Annotations" / "v1" / "00000.png", first)
    write_index_mask(base / "Annotations" / "v1" / "00010.png", later)
    meta = {"videos": {"v1": {"objects": {"1": {"category": "a", "frames": ["00000", "00005"]},
                                          "2": {"category": "b", "frames": ["00010", "00015"]}}}}}
    (base / "meta.json").write_text(json.dumps(meta))
    (seq,) = read_youtube_vos(tmp_path, "valid")
    assert len(seq) == 4 and seq.annotated == [0, 2]
    assert seq.first_frames() == {1: 0, 2: 2}
    validate_sequence(seq)
    (base / "meta.json").write_text("{}")
    with pytest.raises(DataError, match="meta.json: not a YouTube-VOS meta.json"):
        read_youtube_vos(tmp_path, "valid")


def test_static_image_set(tmp_path):
    for i in range(3):
        write_image(tmp_path / "images" / f"{i}.jpg", np.zeros((8, 10, 3), np.uint8))
        write_index_mask(tmp_path / "masks" / f"{i}.png", np.ones((8, 10), np.uint8))
    images = StaticImageSet(tmp_path)
    assert len(images) == 3
    image, mask = images[1]
    assert image.shape == (8, 10, 3) and mask.shape == (8, 10)
    write_index_mask(tmp_path / "masks" / "2.png", np.ones((8, 9), np.uint8))
    with pytest.raises(DataError, match=r"2\.png: mask is 9x8 but image .*2\.jpg is 10x8"):
        images.validate()
    write_index_mask(tmp_path / "masks" / "9.png", np.ones((8, 10), np.uint8))
    with pytest.raises(DataError, match=r"9\.png: mask has no image"):
        StaticImageSet(tmp_path)
    (tmp_path / "masks" / "9.png").unlink()
    (tmp_path / "masks" / "0.png").unlink()
    with pytest.raises(DataError, match=r"0\.jpg: image has no mask"):
        StaticImageSet(tmp_path)
    assert len(StaticImageSet(tmp_path, require_masks=False)) == 2
    shutil.rmtree(tmp_path / "masks")
    with pytest.raises(DataError, match="masks: folder not found"):
        StaticImageSet(tmp_path)
