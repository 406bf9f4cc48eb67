"""Synthetic training clips from static image + mask pairs (STM pretraining, paper Sec. 3.5).

A clip is N frames of one scene: source 0 is the background layer (its whole image moves, and one of
its objects becomes object 1); sources 1.. give one object each, cut out and pasted on top. Every
layer gets a per-clip affine (placement, zoom, rotation, shear, flips, cropping to the training
size) and, per frame, a further random affine around it, so objects move relative to each other
and to the background; colour jitter per clip and per frame. Deterministic given the Generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from stm_core.data.augment import (
    AffineRange,
    ColorJitter,
    about_center,
    apply_jitter,
    sample_affine,
    sample_jitter,
    translation,
    warp,
)


class PairSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]: ...  # image H x W x 3, ids H x W


def default_clip_affine() -> AffineRange:
    return AffineRange(rotation=15.0, shear=10.0, zoom=[0.9, 1.3], translate=0.05, hflip=0.5)


def default_frame_affine() -> AffineRange:
    return AffineRange(rotation=15.0, shear=10.0, zoom=[0.9, 1.1], translate=0.08)


def default_object_affine() -> AffineRange:
    return AffineRange(rotation=30.0, shear=10.0, zoom=[0.8, 1.2], translate=0.15)


@dataclass
class SynthConfig:
    """How clips are made. The pipeline's params hold the same fields (section `synthesize`)."""

    n_frames: int = 3  # frames per clip (3 for STM, 5 for STRMN)
    height: int = 384  # output frame height (the training crop)
    width: int = 384  # output frame width
    max_objects: int = 3  # objects per clip: uniform in [1, max_objects], each from a different image
    clip_affine: AffineRange = field(default_factory=default_clip_affine)  # per clip, background layer
    frame_affine: AffineRange = field(default_factory=default_frame_affine)  # per frame, every layer
    object_affine: AffineRange = field(default_factory=default_object_affine)  # per clip, pasted objects
    object_scale: list[float] = field(default_factory=lambda: [0.3, 0.6])  # pasted object size / frame side
    clip_jitter: ColorJitter = field(default_factory=lambda: ColorJitter(0.2, 0.2, 0.2, 0.03))
    frame_jitter: ColorJitter = field(default_factory=lambda: ColorJitter(0.05, 0.05, 0.05, 0.01))
    min_area: float = 0.005  # an object must cover this fraction of frame 0 (else it is dropped)
    attempts: int = 10  # re-draws before giving up on a clip with no visible object


@dataclass
class Clip:
    frames: np.ndarray  # N x H x W x 3 uint8
    masks: np.ndarray  # N x H x W uint8, ids 0..n_objects
    n_objects: int
    sources: list[int]  # indices of the source pairs used


def _pick_object(mask: np.ndarray, rng: np.random.Generator) -> int | None:
    ids = [int(i) for i in np.unique(mask) if i != 0]
    return None if not ids else ids[int(rng.integers(len(ids)))]


def _layer(image: np.ndarray, region: np.ndarray, place: np.ndarray, frames: list[np.ndarray],
           size: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Warp one layer (image, boolean region) by the clip placement then each frame's perturbation."""
    fill = tuple(int(v) for v in image[::4, ::4].reshape(-1, 3).mean(0))  # a subsample is plenty
    out = []
    for delta in frames:
        m = about_center(delta, size) @ place
        out.append((warp(image, m, size, fill=fill), warp(region.astype(np.uint8) * 255, m, size, nearest=True) > 127))
    return out


def synthesize_clip(pairs: PairSource, cfg: SynthConfig, rng: np.random.Generator) -> Clip:
    """One clip. Objects are numbered 1..K in layer order; K >= 1 unless every attempt failed."""
    size = (cfg.height, cfg.width)
    best: Clip | None = None
    for _ in range(max(1, cfg.attempts)):
        clip = _attempt(pairs, cfg, rng, size)
        if clip.n_objects > 0:
            return clip
        best = best or clip
    assert best is not None
    return best


def _attempt(pairs: PairSource, cfg: SynthConfig, rng: np.random.Generator, size: tuple[int, int]) -> Clip:
    h, w = size
    n_obj = int(rng.integers(1, max(1, cfg.max_objects) + 1))
    n_src = min(n_obj, len(pairs))
    sources = [int(i) for i in rng.choice(len(pairs), size=n_src, replace=False)]

    layers: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for k, src in enumerate(sources):
        image, mask = pairs[src]
        obj = _pick_object(mask, rng)
        region = mask == obj if obj is not None else np.zeros(mask.shape, bool)
        deltas = [sample_affine(cfg.frame_affine, rng, (w / 2, h / 2), size) for _ in range(cfg.n_frames)]
        if k == 0:
            # Background: cover the output (crop to training size) then the clip affine.
            cover = max(h / image.shape[0], w / image.shape[1])
            place = sample_affine(cfg.clip_affine, rng, (image.shape[1] / 2, image.shape[0] / 2), size, cover)
        else:
            if obj is None:
                continue
            ys, xs = np.nonzero(region)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            image, region = image[y0:y1, x0:x1], region[y0:y1, x0:x1]
            side = rng.uniform(*cfg.object_scale) * min(h, w)
            scale = side / max(y1 - y0, x1 - x0)
            place = sample_affine(cfg.object_affine, rng, ((x1 - x0) / 2, (y1 - y0) / 2), size, scale)
            # Uniform placement anywhere in the frame (translate ranges keep it near the centre otherwise).
            place = translation(rng.uniform(-0.3, 0.3) * w, rng.uniform(-0.3, 0.3) * h) @ place
        layers.append(_layer(image, region, place, deltas, size))

    clip_colour = sample_jitter(cfg.clip_jitter, rng)
    frames = np.zeros((cfg.n_frames, h, w, 3), np.uint8)
    masks = np.zeros((cfg.n_frames, h, w), np.uint8)
    for t in range(cfg.n_frames):
        canvas = layers[0][t][0].copy()
        ids = np.zeros((h, w), np.uint8)
        for k, layer in enumerate(layers):
            img, reg = layer[t]
            if k > 0:
                canvas[reg] = img[reg]
            ids[reg] = k + 1
        frames[t] = apply_jitter(canvas, clip_colour, sample_jitter(cfg.frame_jitter, rng))
        masks[t] = ids

    # Keep objects visible in frame 0 (the memory frame); renumber the survivors 1..K.
    keep = [k + 1 for k in range(len(layers)) if (masks[0] == k + 1).mean() >= cfg.min_area]
    lut = np.zeros(256, np.uint8)
    for new, old in enumerate(keep, start=1):
        lut[old] = new
    return Clip(frames, lut[masks], len(keep), sources)


def synthesize_clips(pairs: PairSource, cfg: SynthConfig, seed: int, indices: Sequence[int]) -> list[Clip]:
    """Clips for the given indices; clip i depends only on (seed, i), never on which worker made it."""
    return [synthesize_clip(pairs, cfg, clip_rng(seed, i)) for i in indices]


def clip_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The Generator of clip `index`: independent streams from (seed, index, stream)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), int(index)]))
