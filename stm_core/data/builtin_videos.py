"""The built-in DAVIS-layout video benchmark (see `stm_core.data.builtin` for the ingredients).

Two styles. `hard` (the default, `stm_core.data.builtin_hard`): long videos where the memory
matters: objects leave the frame and come back, are hidden by occluders, drift in colour, scale
and rotation, enter mid-video, and share the frame with unannotated look-alikes. `easy` (the
original smoke set, below): each object follows a long, roughly straight path through the frame centre (so paths cross and
objects occlude each other), travelling 2-4 times its own size; it also spins, grows or shrinks
and brightens or darkens. Some objects appear mid-video (their id first shows up in a later
annotation, as in YouTube-VOS). The background is a tinted texture that pans slowly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from stm_core.data.augment import check_range, linear, translation, warp
from stm_core.data.builtin import PATCH, SHAPES, _write_json, background_texture, object_texture, shape_mask
from stm_core.data.io import atomic_write_bytes, encode_image, index_mask_png


@dataclass
class BuiltinVideosConfig:
    height: int = 128  # frame height in pixels
    width: int = 128  # frame width in pixels
    frames: int = 24  # frames per sequence
    train_sequences: int = 16  # sequences in ImageSets/2017/train.txt
    val_sequences: int = 8  # sequences in ImageSets/2017/val.txt
    max_objects: int = 3  # objects per sequence: 1..max_objects
    object_size: list[float] = field(default_factory=lambda: [0.28, 0.4])  # [min, max] side / frame side
    travel: list[float] = field(default_factory=lambda: [0.6, 0.85])  # [min, max] path length / frame side
    enter_prob: float = 0.35  # chance that the last object (of 2+) enters mid-video
    style: str = "hard"  # hard (events where memory matters) | easy (the original short, translating set)
    leave_prob: float = 0.6  # (hard) chance per target that it leaves the frame once and comes back
    occluders: int = 1  # (hard) unannotated occluders per sequence, each crossing a target
    distractors: int = 1  # (hard) unannotated look-alikes of the targets per sequence
    hue_drift: float = 75.0  # (hard) largest hue change of a target over the video, degrees
    scale_change: list[float] = field(default_factory=lambda: [0.6, 1.6])  # (hard) [min, max] size factor over time
    spin: float = 270.0  # (hard) largest rotation of a target over the video, degrees

    def __post_init__(self) -> None:
        if self.style not in ("hard", "easy"):
            raise ValueError(f"builtin_videos.style must be 'hard' or 'easy', got {self.style!r}")
        if self.frames < 2 or self.height < 16 or self.width < 16:
            raise ValueError(f"builtin_videos: need frames >= 2 and a frame of at least 16x16, got "
                             f"{self.frames} frames of {self.width}x{self.height}")
        check_range("object_size", self.object_size)
        check_range("travel", self.travel, allow_low=True)
        check_range("scale_change", self.scale_change)


@dataclass
class _Track:
    shape: np.ndarray  # PATCH x PATCH bool
    texture: np.ndarray  # PATCH x PATCH x 3 uint8
    start: np.ndarray  # (x, y) at t = 0
    end: np.ndarray  # (x, y) at t = T - 1
    wiggle: float  # amplitude (px) of a sideways sine on the path
    side: float  # object side in pixels at t = 0
    grow: float  # log scale change over the video
    angle0: float
    spin: float  # degrees over the video
    gain: float  # brightness at the end (1 at the start)
    enter: int  # first frame it is drawn


def _tracks(cfg: BuiltinVideosConfig, rng: np.random.Generator, n_obj: int) -> list[_Track]:
    h, w = cfg.height, cfg.width
    short = min(h, w)
    centre = np.array([w / 2, h / 2])
    shapes = rng.permutation(len(SHAPES))
    base_dir = rng.uniform(0, 2 * math.pi)
    tracks = []
    for k in range(n_obj):
        side = rng.uniform(cfg.object_size[0], cfg.object_size[1]) * short
        length = rng.uniform(cfg.travel[0], cfg.travel[1]) * short
        # Directions spread around the circle so paths cross near the centre.
        phi = base_dir + k * math.pi / max(n_obj, 1) + rng.uniform(-0.3, 0.3)
        direction = np.array([math.cos(phi), math.sin(phi)])
        offset = rng.uniform(-0.12, 0.12, size=2) * np.array([w, h])
        start = centre + offset - direction * length / 2
        end = centre + offset + direction * length / 2
        enter = 0
        if k == n_obj - 1 and n_obj > 1 and rng.random() < cfg.enter_prob:
            enter = int(rng.integers(cfg.frames // 4, cfg.frames // 2 + 1))
        tracks.append(_Track(
            shape=shape_mask(SHAPES[int(shapes[k % len(SHAPES)])], rng),
            texture=object_texture(rng),
            start=start, end=end, wiggle=rng.uniform(-0.08, 0.08) * short, side=side,
            grow=rng.uniform(-0.35, 0.35), angle0=rng.uniform(-180, 180), spin=rng.uniform(-150, 150),
            gain=rng.uniform(0.75, 1.25), enter=enter,
        ))
    return tracks


def _draw(track: _Track, t: int, n_frames: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    u = t / max(n_frames - 1, 1)
    along = track.end - track.start
    normal = np.array([-along[1], along[0]]) / max(np.linalg.norm(along), 1e-9)
    pos = track.start + u * along + normal * track.wiggle * math.sin(2 * math.pi * u)
    scale = track.side * math.exp(track.grow * u) / PATCH
    m = translation(*pos) @ linear(track.angle0 + track.spin * u, 0.0, scale) @ translation(-PATCH / 2, -PATCH / 2)
    region = warp(track.shape.astype(np.uint8) * 255, m, size, nearest=True) > 127
    gain = 1.0 + (track.gain - 1.0) * u
    texture = np.clip(warp(track.texture, m, size).astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return region, texture


def make_sequence(cfg: BuiltinVideosConfig, rng: np.random.Generator, n_obj: int) -> tuple[np.ndarray, np.ndarray]:
    """(frames T x H x W x 3 uint8, masks T x H x W uint8). Later objects are drawn on top."""
    h, w, n = cfg.height, cfg.width, cfg.frames
    pan = 1.4
    big = background_texture(rng, (int(h * pan), int(w * pan)))
    start = rng.uniform(0, 1, size=2) * np.array([big.shape[1] - w, big.shape[0] - h])
    stop = rng.uniform(0, 1, size=2) * np.array([big.shape[1] - w, big.shape[0] - h])
    tracks = _tracks(cfg, rng, n_obj)
    frames = np.zeros((n, h, w, 3), np.uint8)
    masks = np.zeros((n, h, w), np.uint8)
    for t in range(n):
        x, y = (start + (stop - start) * t / max(n - 1, 1)).round().astype(int)
        canvas = big[y:y + h, x:x + w].copy()
        ids = np.zeros((h, w), np.uint8)
        for k, track in enumerate(tracks, start=1):
            if t < track.enter:
                continue
            region, texture = _draw(track, t, n, (h, w))
            canvas[region] = texture[region]
            ids[region] = k
        frames[t], masks[t] = canvas, ids
    return frames, masks


def _acceptable(masks: np.ndarray, n_obj: int, min_area: float) -> bool:
    """Each object is clearly visible in the frame where it first appears."""
    for k in range(1, n_obj + 1):
        present = [t for t in range(len(masks)) if (masks[t] == k).any()]
        if not present or (masks[present[0]] == k).mean() < min_area:
            return False
    return True


def write_builtin_videos(root: str | Path, cfg: BuiltinVideosConfig, seed: int) -> list[dict]:
    """DAVIS layout under `root`: JPEGImages/480p, Annotations/480p (every frame), ImageSets/2017/{train,val}.txt."""
    from stm_core.data.builtin_hard import make_hard_sequence

    root = Path(root)
    min_area = 0.4 * (cfg.object_size[0] ** 2) * 0.5
    info = []
    for split_id, (split, count) in enumerate((("train", cfg.train_sequences), ("val", cfg.val_sequences))):
        names = []
        for i in range(count):
            rng = np.random.default_rng(np.random.SeedSequence([seed, 2, split_id, i]))
            n_obj = 1 + (i % cfg.max_objects) if split == "val" else int(rng.integers(1, cfg.max_objects + 1))
            while True:  # redraw (same stream: still deterministic) until every target shows clearly
                if cfg.style == "hard":
                    frames, masks, meta = make_hard_sequence(cfg, rng, n_obj)
                else:
                    (frames, masks), meta = make_sequence(cfg, rng, n_obj), {}
                if _acceptable(masks, n_obj, min_area):
                    break
            name = f"{split}-{i:03d}"
            names.append(name)
            for t in range(cfg.frames):
                atomic_write_bytes(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", encode_image(frames[t], "jpeg", 95))
                atomic_write_bytes(root / "Annotations" / "480p" / name / f"{t:05d}.png", index_mask_png(masks[t]))
            first = {int(k): int(next(t for t in range(cfg.frames) if (masks[t] == k).any())) for k in range(1, n_obj + 1)}
            info.append({"sequence": name, "split": split, "objects": n_obj, "first_frame": first, **meta})
        atomic_write_bytes(root / "ImageSets" / "2017" / f"{split}.txt", ("\n".join(names) + "\n").encode())
    _write_json(root / "builtin.json", {"kind": "builtin-videos", "seed": seed, "config": asdict(cfg), "sequences": info})
    return info
