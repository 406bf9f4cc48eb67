"""Clip synthesizer, real-video sampler, clip row codec and the built-in datasets: shapes and determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from stm_core.data import (
    BuiltinImagesConfig,
    BuiltinVideosConfig,
    StaticImageSet,
    SynthConfig,
    SyntheticClipDataset,
    VideoClipDataset,
    VideoClipSampler,
    VideoSamplerConfig,
    clip_rng,
    decode_clip,
    decode_clip_batch,
    encode_clip_row,
    max_skip_schedule,
    read_davis,
    sample_positions,
    synthesize_clip,
    validate_videos,
    write_builtin_images,
    write_builtin_videos,
)

SMALL_VIDEOS = BuiltinVideosConfig(height=64, width=64, frames=8, train_sequences=2, val_sequences=3, style="easy")


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> StaticImageSet:
    root = tmp_path_factory.mktemp("builtin-images")
    write_builtin_images(root, BuiltinImagesConfig(count=12, size=64), seed=3)
    return StaticImageSet(root)


@pytest.fixture(scope="module")
def videos_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("builtin-videos")
    write_builtin_videos(root, SMALL_VIDEOS, seed=5)
    return root


def test_builtin_images_deterministic(tmp_path, images):
    write_builtin_images(tmp_path, BuiltinImagesConfig(count=12, size=64), seed=3)
    assert _tree_digest(tmp_path) == _tree_digest(images.roots[0])
    write_builtin_images(tmp_path / "other", BuiltinImagesConfig(count=12, size=64), seed=4)
    assert _tree_digest(tmp_path / "other") != _tree_digest(tmp_path)
    for i in range(len(images)):
        image, mask = images[i]
        assert image.shape == (64, 64, 3) and mask.max() >= 1


def test_builtin_videos_layout_and_determinism(tmp_path, videos_root):
    write_builtin_videos(tmp_path, SMALL_VIDEOS, seed=5)
    assert _tree_digest(tmp_path) == _tree_digest(videos_root)
    train, val = read_davis(videos_root, "train"), read_davis(videos_root, "val")
    assert [v.name for v in train] == ["train-000", "train-001"] and len(val) == 3
    assert validate_videos(train + val) == []
    for seq in val:
        assert len(seq) == 8 and seq.dense
        masks = np.stack([seq.load_mask(t) for t in range(len(seq))])
        for obj, first in seq.first_frames().items():
            # each object travels further than its own size: the first mask is a poor guess later
            ys0, xs0 = np.nonzero(masks[first] == obj)
            present = [t for t in range(len(seq)) if (masks[t] == obj).sum() > 0.5 * len(ys0)]
            ys1, xs1 = np.nonzero(masks[present[-1]] == obj)
            size = max(np.ptp(ys0), np.ptp(xs0))
            moved = np.hypot(ys1.mean() - ys0.mean(), xs1.mean() - xs0.mean())
            if present[-1] - first >= 4:
                assert moved > 0.8 * size, (seq.name, obj, moved, size)


def test_synthesize_clip_shapes_and_determinism(images):
    cfg = SynthConfig(n_frames=3, height=48, width=56, max_objects=3)
    a = synthesize_clip(images, cfg, clip_rng(0, 7))
    b = synthesize_clip(images, cfg, clip_rng(0, 7))
    c = synthesize_clip(images, cfg, clip_rng(0, 8))
    assert a.frames.shape == (3, 48, 56, 3) and a.frames.dtype == np.uint8
    assert a.masks.shape == (3, 48, 56)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert not np.array_equal(a.frames, c.frames)
    for i in range(20):
        clip = synthesize_clip(images, cfg, clip_rng(1, i))
        assert 1 <= clip.n_objects <= 3
        assert set(np.unique(clip.masks[0]).tolist()) == set(range(clip.n_objects + 1))
        assert len(set(clip.sources)) == len(clip.sources)  # objects come from different images
        assert clip.masks.max() <= clip.n_objects


def test_frames_differ_within_a_clip(images):
    clip = synthesize_clip(images, SynthConfig(n_frames=5, height=48, width=48), clip_rng(2, 0))
    assert not np.array_equal(clip.masks[0], clip.masks[4])


def test_clip_row_roundtrip(images):
    clip = synthesize_clip(images, SynthConfig(n_frames=3, height=32, width=40), clip_rng(0, 1))
    row = encode_clip_row(1, clip, "png")
    assert row["n_frames"] == 3 and row["height"] == 32 and row["width"] == 40
    frames, masks, n = decode_clip(row)
    assert frames.shape == (3, 3, 32, 40) and frames.dtype == torch.float32 and masks.dtype == torch.long
    np.testing.assert_array_equal(masks.numpy(), clip.masks)  # masks are lossless
    np.testing.assert_array_equal((frames * 255).round().byte().permute(0, 2, 3, 1).numpy(), clip.frames)
    assert n == clip.n_objects
    batch = {k: [row[k], row[k]] for k in row}
    f, m, counts = decode_clip_batch(batch)
    assert f.shape == (2, 3, 3, 32, 40) and counts.tolist() == [n, n]


def test_synthetic_dataset(images):
    ds = SyntheticClipDataset(images, SynthConfig(n_frames=3, height=32, width=32), length=4, seed=9)
    f, m, n = ds[2]
    f2, _, _ = ds[2]
    assert f.shape == (3, 3, 32, 32) and torch.equal(f, f2) and len(ds) == 4


def test_skip_schedule_and_positions():
    assert [max_skip_schedule(s, 100, 0, 25) for s in (0, 50, 100, 200)] == [0, 12, 25, 25]
    assert max_skip_schedule(30, 100, 0, 25, ramp=0.3) == 25
    rng = np.random.default_rng(0)
    for skip in (0, 3, 25):
        for _ in range(50):
            pos = sample_positions(20, 3, skip, rng)
            gaps = np.diff(pos)
            assert pos[0] >= 0 and pos[-1] < 20 and (gaps >= 1).all() and (gaps <= skip + 1).all()
    assert sample_positions(10, 10, 25, rng) == list(range(10))  # long STRMN clips shrink the skip
    with pytest.raises(ValueError):
        sample_positions(3, 5, 0, rng)


def test_video_sampler(videos_root):
    videos = read_davis(videos_root, "train")
    cfg = VideoSamplerConfig(n_frames=3, height=40, width=40, max_objects=2)
    sampler = VideoClipSampler(videos, cfg)
    a, b = sampler.sample(clip_rng(0, 3), 4), sampler.sample(clip_rng(0, 3), 4)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert a.frames.shape == (3, 40, 40, 3) and a.masks.shape == (3, 40, 40)
    assert a.indices == sorted(a.indices) and max(np.diff(a.indices)) <= 5
    assert 1 <= a.n_objects <= 2 and a.masks.max() <= a.n_objects
    long = VideoClipSampler(videos, VideoSamplerConfig(n_frames=8, height=40, width=40)).sample(clip_rng(0, 0), 25)
    assert long.indices == list(range(8))
    with pytest.raises(ValueError, match="annotated frames"):
        VideoClipSampler(videos, VideoSamplerConfig(n_frames=9))
    ds = VideoClipDataset(videos, cfg, length=3, seed=1)
    ds.set_max_skip(2)
    f, m, n = ds[0]
    assert f.shape == (3, 3, 40, 40) and m.shape == (3, 40, 40) and n >= 1


def test_video_sampler_on_sparse_real_video(davis_sample):
    (judo,) = read_davis(davis_sample, split=None, sequences=["judo"])
    clip = VideoClipSampler([judo], VideoSamplerConfig(n_frames=3, height=64, width=64)).sample(clip_rng(0, 0), 25)
    assert set(clip.indices) <= {0, 5, 8, 13}  # only annotated frames are sampled


def test_affine_mode_moves_one_image_and_its_own_objects(images):
    """STM sec. 3.5: every frame is a random affine view of one static image (the paste mode's
    clips are layers of several images)."""
    cfg = SynthConfig(n_frames=3, height=48, width=48, max_objects=3, mode="affine")
    for i in range(12):
        clip = synthesize_clip(images, cfg, clip_rng(4, i))
        assert len(clip.sources) == 1 and 1 <= clip.n_objects <= 3
        assert set(np.unique(clip.masks[0]).tolist()) == set(range(clip.n_objects + 1))
        assert not np.array_equal(clip.frames[0], clip.frames[2])  # each frame its own transform
        image, mask = images[clip.sources[0]]
        assert clip.n_objects <= len([i for i in np.unique(mask) if i])  # only that image's objects
    a = synthesize_clip(images, cfg, clip_rng(4, 0))
    np.testing.assert_array_equal(a.frames, synthesize_clip(images, cfg, clip_rng(4, 0)).frames)
    paste = SynthConfig(n_frames=3, height=48, width=48, max_objects=3)  # the default mode is unchanged
    assert paste.mode == "paste" and synthesize_clip(images, paste, clip_rng(1, 0)).sources != a.sources
    with pytest.raises(ValueError, match="mode"):
        SynthConfig(mode="copy")  # type: ignore[arg-type]


def test_held_out_images_are_stable_and_disjoint(images):
    from stm_core.data.synth import split_pairs

    assert split_pairs(images, "all", 0.3) is images
    train, val = split_pairs(images, "train", 0.3), split_pairs(images, "val", 0.3)
    assert len(train) + len(val) == len(images) and len(val) >= 1 and len(train) >= 1
    assert not set(train.indices) & set(val.indices)
    assert split_pairs(images, "val", 0.3).indices == val.indices  # by name: the same every time
    cfg = SynthConfig(n_frames=3, height=32, width=32, mode="affine", split="val", val_share=0.3)
    for i in range(5):  # val clips draw from held-out images only
        clip = synthesize_clip(val, cfg, clip_rng(0, i))
        assert val.indices[clip.sources[0]] in val.indices
    with pytest.raises(ValueError, match="val_share"):
        SynthConfig(split="val", val_share=0.0)


def test_short_videos_are_dropped_or_played_back_and_forth(videos_root):
    from stm_core.data.sampler import pingpong_positions, short_videos

    videos = read_davis(videos_root, "train")  # 8 annotated frames each
    assert short_videos(videos, 10) == ["train-000", "train-001"] and short_videos(videos, 8) == []
    with pytest.raises(ValueError, match="annotated frames"):
        VideoClipSampler(videos, VideoSamplerConfig(n_frames=10))  # drop (the default): none left
    sampler = VideoClipSampler(videos, VideoSamplerConfig(n_frames=20, height=32, width=32, short_videos="repeat"))
    assert sampler.short == ["train-000", "train-001"] and len(sampler.videos) == 2
    clip = sampler.sample(clip_rng(0, 1), 0)
    assert clip.frames.shape == (20, 32, 32, 3) and set(clip.indices) <= set(range(8))
    assert all(abs(b - a) == 1 for a, b in zip(clip.indices, clip.indices[1:]))  # continuous motion
    rng = np.random.default_rng(0)
    pos = pingpong_positions(3, 7, rng)
    assert len(pos) == 7 and set(pos) <= {0, 1, 2} and all(abs(b - a) == 1 for a, b in zip(pos, pos[1:]))
    assert pingpong_positions(1, 4, rng) == [0, 0, 0, 0]
