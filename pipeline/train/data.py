"""Training batches for the trainer: synthetic Parquet rows and real-video clips -> padded tensors.

The clip makers are stm_core's (`stm_core.data.clips` decodes the rows of `stm synthesize`,
`stm_core.data.sampler` samples video clips with the skip curriculum); `pipeline.train.input` runs
them in Ray Data. This module crops synthetic clips, batches clips and draws overlays (numpy/torch),
and names a stage's data (`DataSpec`) and opens its videos.

A clip is `frames: N x H x W x 3 uint8` plus `masks: N x H x W uint8` whose ids are 1..K for the
objects visible in frame 0 (the memory frame) and 0 elsewhere; objects that only appear later are
background, as in STM's training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

Clip = tuple[np.ndarray, np.ndarray]  # frames N x H x W x 3 uint8, masks N x H x W uint8


@dataclass(frozen=True)
class DataSpec:
    """A stage's training data: where every worker reads it and how (the driver's `loop_config`).
    Defined here, not beside `LoopConfig`: `pipeline.train.schedule`, which the settings import,
    opens videos with it, and `pipeline.train.loop_config` imports the settings."""

    kind: Literal["parquet", "videos"]  # synthetic clip shards (rows decoded) or a video set (clips sampled)
    path: str  # a local folder or a URI every worker reaches
    format: Literal["parquet", "davis", "youtube-vos"]  # the layout at `path`
    split: str  # video split (DAVIS ImageSets name / YouTube-VOS folder)
    shuffle_buffer: int  # Parquet rows in each worker's local shuffle buffer (0: no shuffle)
    short_videos: Literal["drop", "repeat"]  # videos shorter than a clip: skipped or repeated (strmn.short_videos)
    cache_mb: float  # node-local cache of store files per reading process (storage.cache_mb)


def relabel(masks: np.ndarray, max_objects: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Keep (up to `max_objects`, a random subset when more) objects of frame 0, renumbered 1..K."""
    ids = [int(i) for i in np.unique(masks[0]) if i != 0]
    if len(ids) > max_objects:
        ids = sorted(rng.choice(ids, size=max_objects, replace=False).tolist()) if rng is not None else ids[:max_objects]
    lut = np.zeros(256, np.uint8)
    for new, old in enumerate(ids, start=1):
        lut[old] = new
    return lut[masks]


def prepare(clip: Clip, crop: int, max_objects: int, rng: np.random.Generator) -> Clip:
    """A random `crop` x `crop` window (when the clip is larger; one window for all frames, preferring
    ones where frame 0 shows an object), a random horizontal flip, frame 0's objects renumbered."""
    frames, masks = clip
    h, w = masks.shape[1:]
    if crop > 0 and (h > crop or w > crop):
        ch, cw = min(crop, h), min(crop, w)
        for _ in range(5):
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            if masks[0, y:y + ch, x:x + cw].any():
                break
        frames, masks = frames[:, y:y + ch, x:x + cw], masks[:, y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        frames, masks = frames[:, :, ::-1], masks[:, :, ::-1]
    return np.ascontiguousarray(frames), relabel(np.ascontiguousarray(masks), max_objects, rng)


def collate(clips: Sequence[Clip]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> frames B x N x 3 x H x W float [0, 1], masks B x N x H x W long, valid B x O bool (O >= 1)."""
    frames = torch.from_numpy(np.stack([c[0] for c in clips])).permute(0, 1, 4, 2, 3).float().div_(255.0)
    masks = torch.from_numpy(np.stack([c[1] for c in clips]).astype(np.int64))
    counts = [int(c[1].max()) for c in clips]
    objects = max(1, *counts) if counts else 1
    valid = torch.arange(1, objects + 1)[None, :] <= torch.tensor(counts)[:, None]
    return frames, masks, valid


def overlay(frame: np.ndarray, gt: np.ndarray, pred: np.ndarray, palette: Sequence[int], alpha: float = 0.5) -> np.ndarray:
    """frame H x W x 3 uint8, ids H x W -> [frame + GT | frame + prediction], H x 2W x 3 uint8."""
    colours = np.asarray(palette, dtype=np.float32).reshape(-1, 3)

    def blend(ids: np.ndarray) -> np.ndarray:
        out = frame.astype(np.float32)
        fg = ids > 0
        out[fg] = (1 - alpha) * out[fg] + alpha * colours[ids[fg]]
        return out.astype(np.uint8)

    return np.concatenate([blend(gt.astype(np.int64)), blend(pred.astype(np.int64))], axis=1)


def clips_per_second(clips: int, seconds: float) -> float:
    return clips / seconds if seconds > 0 and math.isfinite(seconds) else 0.0


def open_videos(data: DataSpec) -> list:
    """The training videos named by the stage's data settings (DAVIS or YouTube-VOS layout). At a
    URI: indexed from one listing and read from the store frame by frame (no copy of the set)."""
    from pipeline.storage import is_uri
    from stm_core.data.video import read_davis, read_youtube_vos

    if is_uri(data.path):
        from pipeline.remote_data import read_davis_at, read_youtube_vos_at

        if data.format == "youtube-vos":
            return read_youtube_vos_at(data.path, data.split, data.cache_mb)
        return read_davis_at(data.path, data.split, data.cache_mb)
    if data.format == "youtube-vos":
        return read_youtube_vos(data.path, data.split)
    return read_davis(data.path, data.split)


def split_holdout(videos: Sequence, holdout: int) -> tuple[list, list]:
    """-> (training videos, the last `holdout` videos for validation)."""
    videos = list(videos)
    if holdout <= 0:
        return videos, []
    if holdout >= len(videos):
        raise ValueError(f"val_holdout = {holdout} leaves no training video (the split has {len(videos)})")
    return videos[:-holdout], videos[-holdout:]


VIDEO_STREAM = 7_000_003  # clip_rng stream of video clips (synthetic sets use their own)


def decode_synthetic(batch: dict[str, Any], crop: int, max_objects: int, seed: int) -> dict[str, np.ndarray]:
    """map_batches function: Parquet clip rows -> prepared clips (crop to `crop`, flip, relabel)."""
    from stm_core.data.clips import decode_clip_arrays
    from stm_core.data.synth import clip_rng

    n = len(batch["clip_id"])
    clips = []
    for i in range(n):
        row = {k: batch[k][i] for k in ("clip_id", "n_frames", "frames", "masks")}
        rng = clip_rng(seed, int(row["clip_id"]), stream=VIDEO_STREAM + 1)
        clips.append(prepare(decode_clip_arrays(row), crop, max_objects, rng))
    return stack(clips, np.full(n, -1, np.int64))


class DecodeSynthetic:
    """decode_synthetic with its settings bound (in-process shards call it)."""

    def __init__(self, crop: int, max_objects: int, seed: int):
        self.crop, self.max_objects, self.seed = crop, max_objects, seed

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        return decode_synthetic(batch, self.crop, self.max_objects, self.seed)


def stack(clips: list, steps: np.ndarray) -> dict[str, np.ndarray]:
    return {"frames": np.stack([c[0] for c in clips]), "masks": np.stack([c[1] for c in clips]),
            "n_objects": np.asarray([int(c[1].max()) for c in clips], np.int64), "step": steps}
