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
