"""Synthetic clips as table rows (the Parquet schema of `stm synthesize`) and back to tensors.

Row schema (one clip per row):
  clip_id: int64, n_frames: int32, n_objects: int32, height: int32, width: int32,
  frames: list<binary> (JPEG or PNG per frame), masks: list<binary> (palette PNG per frame),
  sources: list<int32> (indices of the static pairs used), image_format: string.
Decoding needs only Pillow; reading the Parquet files is the caller's (pyarrow / Ray Data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from stm_core.data.io import DataError, decode_image, decode_index_mask_png, encode_image, index_mask_png
from stm_core.data.sampler import clip_tensors
from stm_core.data.synth import Clip, PairSource, SynthConfig, clip_rng, synthesize_clip


def encode_clip_row(clip_id: int, clip: Clip, image_format: str = "jpeg", quality: int = 90) -> dict[str, Any]:
    n, h, w = clip.masks.shape
    return {
        "clip_id": int(clip_id),
        "n_frames": int(n),
        "n_objects": int(clip.n_objects),
        "height": int(h),
        "width": int(w),
        "frames": [encode_image(f, image_format, quality) for f in clip.frames],
        "masks": [index_mask_png(m) for m in clip.masks],
        "sources": [int(s) for s in clip.sources],
        "image_format": image_format,
    }


def decode_clip_arrays(row: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A row -> (frames N x H x W x 3 uint8, masks N x H x W uint8), checked against its metadata."""
    where = f"synthetic clip {row.get('clip_id', '?')}"
    frames = np.stack([decode_image(bytes(b), where) for b in row["frames"]])
    masks = np.stack([decode_index_mask_png(bytes(b), where) for b in row["masks"]])
    n = int(row.get("n_frames", len(frames)))
    if len(frames) != n or len(masks) != n:
        raise DataError(f"{where}: n_frames is {n} but the row holds {len(frames)} frames and {len(masks)} masks")
    if frames.shape[1:3] != masks.shape[1:]:
        raise DataError(f"{where}: frames are {frames.shape[1:3]} but masks are {masks.shape[1:]}")
    return frames, masks


def decode_clip(row: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A row -> (frames N x 3 x H x W float in [0, 1], masks N x H x W long, n_objects)."""
    frames, masks = decode_clip_arrays(row)
    f, m = clip_tensors(frames, masks)
    return f, m, int(row.get("n_objects", int(masks.max())))


def decode_clip_batch(batch: Mapping[str, Sequence[Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A columnar batch (dict of columns, as Ray Data's `iter_batches` gives) of same-size clips ->
    frames B x N x 3 x H x W, masks B x N x H x W, n_objects B."""
    n = len(batch["clip_id"])
    rows = [{k: batch[k][i] for k in batch} for i in range(n)]
    decoded = [decode_clip(r) for r in rows]
    return (torch.stack([d[0] for d in decoded]), torch.stack([d[1] for d in decoded]),
            torch.tensor([d[2] for d in decoded], dtype=torch.long))


class SyntheticClipDataset(torch.utils.data.Dataset):
    """On-the-fly synthetic clips (no Parquet): item i is clip i of `seed`, exactly what
    `stm synthesize` writes for that index with the same config (before image encoding)."""

    def __init__(self, pairs: PairSource, cfg: SynthConfig, length: int, seed: int = 0):
        self.pairs, self.cfg, self.length, self.seed = pairs, cfg, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        clip = synthesize_clip(self.pairs, self.cfg, clip_rng(self.seed, index))
        f, m = clip_tensors(clip.frames, clip.masks)
        return f, m, clip.n_objects
