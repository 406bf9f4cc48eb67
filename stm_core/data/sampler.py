"""Main-training clips from real videos (STM Sec. 3.5): N temporally ordered annotated frames with
random skips whose maximum grows over training (0 -> 25 in the paper), and long clips for STRMN.

A video with fewer annotated frames than a clip (DAVIS-2017 train has several under STRMN's 50) is
dropped (`short_videos: drop`, the default) or sampled with repetition (`repeat`): its frames
played forwards and backwards (0 1 2 1 0 1 ...) from a random point, so the motion stays
continuous and the clip keeps its length (and its TBPTT segments). `short_videos()` counts them.

Pure numpy + Pillow; `VideoClipDataset` wraps it for a torch DataLoader. Deterministic: clip `i`
at curriculum skip `s` depends only on (seed, epoch, i, s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from stm_core.data.augment import AffineRange, ColorJitter, apply_jitter, sample_affine, sample_jitter, warp
from stm_core.data.synth import clip_rng
from stm_core.data.video import VideoSequence


def max_skip_schedule(step: int, total_steps: int, start: int = 0, end: int = 25, ramp: float = 1.0) -> int:
    """Curriculum: the largest skip grows linearly from `start` to `end` over the first `ramp` share of
    `total_steps`, then stays at `end`."""
    if total_steps <= 0 or ramp <= 0:
        return end
    frac = min(1.0, max(0.0, step / (ramp * total_steps)))
    return int(round(start + (end - start) * frac))


def sample_positions(length: int, n: int, max_skip: int, rng: np.random.Generator) -> list[int]:
    """n increasing indices in [0, length): consecutive gaps uniform in 1..max_skip+1, the skip
    shrunk when the clip would not fit. Needs length >= n."""
    if length < n:
        raise ValueError(f"cannot take {n} ordered frames from {length}")
    if n == 1:
        return [int(rng.integers(length))]
    skip = max(0, min(max_skip, (length - 1) // (n - 1) - 1))
    gaps = rng.integers(1, skip + 2, size=n - 1)
    start = int(rng.integers(0, length - int(gaps.sum())))
    return [start, *(start + np.cumsum(gaps)).astype(int).tolist()]


def pingpong_positions(length: int, n: int, rng: np.random.Generator) -> list[int]:
    """n consecutive indices of [0, length) bouncing at both ends (0 1 2 1 0 1 ...), from a random
    point and direction: a clip longer than its video that still moves one frame at a time."""
    if length <= 1:
        return [0] * n
    period = 2 * (length - 1)
    start = int(rng.integers(period))
    return [k if k < length else period - k for k in ((start + t) % period for t in range(n))]


def short_videos(videos: Sequence[VideoSequence], n_frames: int) -> list[str]:
    """Names of the videos with fewer than `n_frames` annotated frames."""
    return [v.name for v in videos if len(v.annotated) < n_frames]


@dataclass
class VideoSamplerConfig:
    n_frames: int = 3  # frames per clip (3 for STM; longer for STRMN, e.g. 10)
    height: int = 384  # crop height
    width: int = 384  # crop width
    max_objects: int = 3  # objects kept (those visible in the first sampled frame), renumbered 1..K
    scale: list[float] = field(default_factory=lambda: [0.8, 1.2])  # clip zoom relative to "cover the crop"
    frame_affine: AffineRange = field(default_factory=lambda: AffineRange(rotation=5.0, shear=5.0, zoom=[0.95, 1.05],
                                                                          translate=0.02))  # per frame
    hflip: float = 0.5  # probability of flipping the whole clip
    reverse: float = 0.0  # probability of playing the clip backwards
    jitter: ColorJitter = field(default_factory=lambda: ColorJitter(0.1, 0.1, 0.1, 0.02))  # per frame
    min_area: float = 0.002  # share of the first frame an object needs to count
    tries: int = 10  # re-draws before returning a clip with no object
    short_videos: Literal["drop", "repeat"] = "drop"  # videos shorter than n_frames: skipped, or played back and forth


@dataclass
class VideoClip:
    frames: np.ndarray  # N x H x W x 3 uint8
    masks: np.ndarray  # N x H x W uint8, ids 1..n_objects
    n_objects: int
    video: str
    indices: list[int]  # frame indices in the source video


class VideoClipSampler:
    """Draws clips from the annotated frames of `videos` (sparse annotation: only annotated frames count)."""

    def __init__(self, videos: Sequence[VideoSequence], cfg: VideoSamplerConfig):
        self.cfg = cfg
        if cfg.short_videos not in ("drop", "repeat"):
            raise ValueError(f"short_videos must be drop or repeat, got {cfg.short_videos!r}")
        self.short = short_videos(videos, cfg.n_frames)  # counted by the stages (log, metrics)
        repeat = cfg.short_videos == "repeat"
        self.videos = [v for v in videos if len(v.annotated) >= (1 if repeat else cfg.n_frames)]
        if not self.videos:
            names = ", ".join(v.name for v in videos) or "none"
            raise ValueError(f"no video has {cfg.n_frames} annotated frames (videos: {names})")

    def sample(self, rng: np.random.Generator, max_skip: int) -> VideoClip:
        clip = None
        for _ in range(max(1, self.cfg.tries)):
            clip = self._attempt(rng, max_skip)
            if clip.n_objects > 0:
                break
        assert clip is not None
        return clip

    def _attempt(self, rng: np.random.Generator, max_skip: int) -> VideoClip:
        cfg = self.cfg
        video = self.videos[int(rng.integers(len(self.videos)))]
        annotated = video.annotated
        if len(annotated) < cfg.n_frames:  # only with short_videos: repeat
            positions = pingpong_positions(len(annotated), cfg.n_frames, rng)
        else:
            positions = sample_positions(len(annotated), cfg.n_frames, max_skip, rng)
        picks = [annotated[p] for p in positions]
        if rng.random() < cfg.reverse:
            picks = picks[::-1]
        size = (cfg.height, cfg.width)
        images = [video.load_image(i) for i in picks]
        masks: list[np.ndarray] = []  # H x W uint8 ids, one per pick
        for k, i in enumerate(picks):
            mask = video.load_mask(i, images[k].shape[:2])
            assert mask is not None, f"{video.name}: frame {i} is in annotated but has no mask"
            masks.append(mask)
        h, w = images[0].shape[:2]
        cover = max(cfg.height / h, cfg.width / w)
        zoom = AffineRange(zoom=list(cfg.scale), translate=0.0, hflip=cfg.hflip)
        # Crop centre: a random point of the first frame's objects when there are some (so the
        # clip shows them), else anywhere.
        ys, xs = np.nonzero(masks[0])
        if len(ys):
            k = int(rng.integers(len(ys)))
            centre = (float(xs[k]), float(ys[k]))
        else:
            centre = (float(rng.uniform(0, w)), float(rng.uniform(0, h)))
        place = sample_affine(zoom, rng, centre, size, cover)
        out_f = np.zeros((cfg.n_frames, *size, 3), np.uint8)
        out_m = np.zeros((cfg.n_frames, *size), np.uint8)
        for t in range(cfg.n_frames):
            delta = sample_affine(cfg.frame_affine, rng, (cfg.width / 2, cfg.height / 2), size)
            m = delta @ place
            out_f[t] = apply_jitter(warp(images[t], m, size), sample_jitter(cfg.jitter, rng))
            out_m[t] = warp(masks[t], m, size, nearest=True)
        ids = [int(i) for i in np.unique(out_m[0]) if i != 0 and (out_m[0] == i).mean() >= cfg.min_area]
        if len(ids) > cfg.max_objects:
            ids = sorted(int(i) for i in rng.choice(ids, size=cfg.max_objects, replace=False))
        lut = np.zeros(256, np.uint8)
        for new, old in enumerate(ids, start=1):
            lut[old] = new
        return VideoClip(out_f, lut[out_m], len(ids), video.name, picks)


def clip_tensors(frames: np.ndarray, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N x H x W x 3 and ids N x H x W -> float `N x 3 x H x W` in [0, 1], long `N x H x W`."""
    f = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
    return f, torch.from_numpy(np.ascontiguousarray(masks)).long()


class VideoClipDataset(torch.utils.data.Dataset):
    """A map-style view of the sampler: item i -> (frames N x 3 x H x W, masks N x H x W, n_objects).

    Call `set_max_skip(s)` (curriculum) and `set_epoch(e)` between epochs; items depend only on
    (seed, epoch, index, max_skip), so DataLoader workers agree with each other.
    """

    def __init__(self, videos: Sequence[VideoSequence], cfg: VideoSamplerConfig, length: int, seed: int = 0,
                 max_skip: int = 0):
        self.sampler = VideoClipSampler(videos, cfg)
        self.length, self.seed, self.max_skip, self.epoch = length, seed, max_skip, 0

    def set_max_skip(self, max_skip: int) -> None:
        self.max_skip = int(max_skip)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        rng = clip_rng(self.seed, index, stream=1_000_000 + self.epoch * 1000 + self.max_skip)
        clip = self.sampler.sample(rng, self.max_skip)
        frames, masks = clip_tensors(clip.frames, clip.masks)
        return frames, masks, clip.n_objects
