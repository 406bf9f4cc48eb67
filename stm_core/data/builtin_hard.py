"""The `hard` built-in benchmark: long videos in which what the memory holds decides the score.

Every sequence is built from the scikit-image sample images (offline) and is a pure function of
its random stream. Actors, bottom to top:
  distractors  unannotated look-alikes of a target (its shape and texture, a small hue shift),
               keeping the target's *first-frame* look while the target itself drifts
  targets      the annotated objects: smooth random paths; with `leave_prob` a target leaves the
               frame once for a while and comes back; size, rotation, hue and brightness drift
               over the video; the last of 2+ targets may enter mid-video (`enter_prob`)
  occluders    unannotated, larger, opaque objects whose straight path crosses a target in the
               middle of the video (they hide it completely for a few frames)

Why this separates the memory policies: `previous` loses a target for good once it is hidden
or out of frame (its memory then holds no object); `first` re-finds it but, as the target
drifts away from its first look, prefers the look-alike that kept it; policies that keep
recent frames and the first one (every:N, fifo:K) follow the drift and recover after gaps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stm_core.data.augment import _hue_matrix, linear, translation, warp
from stm_core.data.builtin import (
    COLOUR_IMAGES,
    PATCH,
    SHAPES,
    _crop,
    _resize,
    background_texture,
    object_texture,
    sample_image,
    shape_mask,
)


@dataclass
class Actor:
    shape: np.ndarray  # PATCH x PATCH bool
    texture: np.ndarray  # PATCH x PATCH x 3 uint8
    path: np.ndarray  # T x 2: centre (x, y) per frame
    side: float  # side in pixels at scale 1
    scale: np.ndarray  # T: size factor per frame
    angle: np.ndarray  # T: degrees per frame
    hue: np.ndarray  # T: radians of hue shift per frame
    gain: np.ndarray  # T: brightness factor per frame
    enter: int = 0  # first frame it is drawn


def _ease(u: np.ndarray) -> np.ndarray:
    return u * u * (3 - 2 * u)


def interpolate(times: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Knots (times K ascending, values K x D) -> n x D, eased between knots (no overshoot)."""
    t = np.arange(n, dtype=np.float64)
    seg = np.clip(np.searchsorted(times, t, side="right") - 1, 0, len(times) - 2)
    t0, t1 = times[seg], times[seg + 1]
    u = _ease(np.clip((t - t0) / np.maximum(t1 - t0, 1e-9), 0, 1))[:, None]
    return values[seg] * (1 - u) + values[seg + 1] * u


def _drift(rng: np.random.Generator, n: int, end: float) -> np.ndarray:
    """A smooth curve from 0 at frame 0 to `end` at the last frame, wandering a little between."""
    knots = max(2, n // 20 + 2)
    times = np.linspace(0, n - 1, knots)
    values = np.linspace(0, end, knots) + np.r_[0, rng.uniform(-0.25, 0.25, knots - 2) * abs(end), 0]
    return interpolate(times, values[:, None], n)[:, 0]


def _path(rng: np.random.Generator, n: int, size: tuple[int, int], margin: float, leave: float | None,
          outside: float) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Centres per frame (n x 2) through random in-frame waypoints; `leave` (a share of the video)
    adds an exit: the path goes `outside` pixels past a border, stays there, and comes back.
    Returns the path and the frames [a, b) during which the centre sits outside."""
    h, w = size
    knots = max(2, n // 12 + 1)
    times = np.linspace(0, n - 1, knots) + np.r_[0, rng.uniform(-0.3, 0.3, knots - 2) * (n - 1) / knots, 0]
    lo, hi = np.array([margin, margin]), np.array([w - margin, h - margin])
    points = rng.uniform(lo, np.maximum(hi, lo + 1), size=(knots, 2))
    gap = None
    if leave is not None and n >= 8:
        a = int(round(leave * (n - 1)))
        stay = max(2, n // 12)
        a = min(max(a, 2), n - stay - 3)
        b = a + stay
        side = int(rng.integers(4))  # 0 left, 1 right, 2 top, 3 bottom
        anchor = interpolate(times, points, n)[a]
        out = anchor.copy()
        out[side // 2] = -outside if side % 2 == 0 else (w, h)[side // 2] + outside
        keep = (times < a - 2) | (times > b + 2)
        times = np.r_[times[keep], a, b]
        points = np.r_[points[keep], out[None], out[None]]
        order = np.argsort(times, kind="stable")
        times, points = times[order], points[order]
        gap = (a, b)
    return interpolate(times, points, n), gap


def draw_actor(actor: Actor, t: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """-> (region H x W bool, texture H x W x 3 uint8) of the actor at frame t."""
    scale = actor.side * actor.scale[t] / PATCH
    m = translation(*actor.path[t]) @ linear(float(actor.angle[t]), 0.0, scale) @ translation(-PATCH / 2, -PATCH / 2)
    region = warp(actor.shape.astype(np.uint8) * 255, m, size, nearest=True) > 127
    colour = _hue_matrix(float(actor.hue[t])) * float(actor.gain[t])
    texture = warp(actor.texture, m, size).astype(np.float32) @ colour.T.astype(np.float32)
    return region, np.clip(texture, 0, 255).astype(np.uint8)


def _target(cfg, rng: np.random.Generator, n: int, shape_kind: str, enter: int, leaves: bool) -> tuple[Actor, tuple | None]:
    h, w = cfg.height, cfg.width
    side = rng.uniform(*cfg.object_size) * min(h, w)
    lo, hi = (math.log(x) for x in cfg.scale_change)
    end_scale = rng.uniform(lo, hi)
    if abs(end_scale) < 0.5 * max(abs(lo), abs(hi)):  # a clear change, not a tiny one
        end_scale = hi if end_scale >= 0 else lo
    span = n - enter
    leave = rng.uniform(0.35, 0.7) if leaves else None
    outside = side * max(cfg.scale_change) * 0.75 + 4  # the whole object is past the border
    path, gap = _path(rng, span, (h, w), side * 0.45, leave, outside)
    def pad(x: np.ndarray) -> np.ndarray:  # frames before `enter` repeat its first state (never drawn)
        return np.concatenate([np.repeat(x[:1], enter, 0), x]) if enter else x
    sign = lambda: 1.0 if rng.random() < 0.5 else -1.0  # noqa: E731
    actor = Actor(
        shape=shape_mask(shape_kind, rng), texture=object_texture(rng), path=pad(path), side=side,
        scale=pad(np.exp(_drift(rng, span, end_scale))),
        angle=pad(rng.uniform(-180, 180) + _drift(rng, span, sign() * rng.uniform(0.4, 1.0) * cfg.spin)),
        hue=pad(_drift(rng, span, sign() * math.radians(rng.uniform(0.6, 1.0) * cfg.hue_drift))),
        gain=pad(np.exp(_drift(rng, span, rng.uniform(-0.3, 0.3)))), enter=enter)
    return actor, (None if gap is None else (gap[0] + enter, gap[1] + enter))


def _distractor(cfg, rng: np.random.Generator, n: int, twin: Actor) -> Actor:
    """The twin's shape and texture with its first-frame look (a small hue offset), its own path."""
    side = twin.side * rng.uniform(0.85, 1.1)
    path, _ = _path(rng, n, (cfg.height, cfg.width), side * 0.45, None, 0.0)
    angle0 = float(twin.angle[twin.enter]) + rng.uniform(-30, 30)
    return Actor(shape=twin.shape, texture=twin.texture, path=path, side=side, scale=np.ones(n),
                 angle=angle0 + _drift(rng, n, rng.uniform(-40, 40)), hue=np.full(n, rng.uniform(-0.15, 0.15)),
                 gain=np.ones(n))


def _occluder(cfg, rng: np.random.Generator, n: int, target: Actor, start: int) -> Actor:
    """A straight, steady path that passes over `target`'s centre at a middle frame after `start`."""
    h, w = cfg.height, cfg.width
    t_hit = int(rng.integers(start + (n - start) // 4, start + 3 * (n - start) // 4 + 1))
    hit = target.path[min(t_hit, n - 1)]
    side = target.side * float(target.scale[min(t_hit, n - 1)]) * rng.uniform(1.5, 1.9)
    phi = rng.uniform(0, 2 * math.pi)
    speed = rng.uniform(1.0, 1.6) * max(h, w) / max(n - 1, 1)  # crosses the frame about once
    t = np.arange(n, dtype=np.float64)[:, None]
    path = hit[None] + (t - t_hit) * speed * np.array([math.cos(phi), math.sin(phi)])[None]
    name = COLOUR_IMAGES[int(rng.integers(len(COLOUR_IMAGES)))]
    texture = _resize(_crop(sample_image(name), rng.uniform(0.3, 0.7), rng), (PATCH, PATCH))
    shape = shape_mask("ellipse", rng)
    return Actor(shape=shape, texture=texture, path=path, side=side, scale=np.ones(n),
                 angle=np.full(n, rng.uniform(-180, 180)), hue=np.zeros(n), gain=np.ones(n))


def _spans(flags: np.ndarray) -> list[list[int]]:
    """Frames where `flags` is true as [start, stop) spans."""
    out, start = [], None
    for t, f in enumerate(flags.tolist() + [False]):
        if f and start is None:
            start = t
        elif not f and start is not None:
            out.append([start, t])
            start = None
    return out


def make_hard_sequence(cfg, rng: np.random.Generator, n_obj: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(frames T x H x W x 3 uint8, masks T x H x W uint8, events) for `n_obj` targets.

    events: {"targets": {id: {"enter", "out_of_frame": spans, "occluded": spans, "hidden": spans}},
    "distractors": n, "occluders": n}; spans are [start, stop) frames; "occluded" means less than
    half of the target's drawn area is visible, "hidden" that none of it is (either cause).
    """
    h, w, n = cfg.height, cfg.width, cfg.frames
    pan = 1.4
    big = background_texture(rng, (int(h * pan), int(w * pan)))
    cam0 = rng.uniform(0, 1, size=2) * np.array([big.shape[1] - w, big.shape[0] - h])
    cam1 = rng.uniform(0, 1, size=2) * np.array([big.shape[1] - w, big.shape[0] - h])
    kinds = rng.permutation(len(SHAPES))
    targets, gaps = [], []
    for k in range(n_obj):
        enter = 0
        if k == n_obj - 1 and n_obj > 1 and n >= 8 and rng.random() < cfg.enter_prob:
            enter = int(rng.integers(n // 4, n // 2 + 1))
        actor, gap = _target(cfg, rng, n, SHAPES[int(kinds[k % len(SHAPES)])], enter, rng.random() < cfg.leave_prob)
        targets.append(actor)
        gaps.append(gap)
    distractors = [_distractor(cfg, rng, n, targets[int(rng.integers(n_obj))]) for _ in range(cfg.distractors)]
    occluders = []
    for _ in range(cfg.occluders):
        k = int(rng.integers(n_obj))
        occluders.append(_occluder(cfg, rng, n, targets[k], targets[k].enter))
    frames = np.zeros((n, h, w, 3), np.uint8)
    masks = np.zeros((n, h, w), np.uint8)
    drawn = np.zeros((n, n_obj), np.int64)  # each target's own area, before anything covers it
    for t in range(n):
        x, y = (cam0 + (cam1 - cam0) * t / max(n - 1, 1)).round().astype(int)
        canvas = big[y:y + h, x:x + w].copy()
        ids = np.zeros((h, w), np.uint8)
        for actor in distractors:
            region, texture = draw_actor(actor, t, (h, w))
            canvas[region] = texture[region]
        for k, actor in enumerate(targets, start=1):
            if t < actor.enter:
                continue
            region, texture = draw_actor(actor, t, (h, w))
            canvas[region] = texture[region]
            ids[region] = k
            drawn[t, k - 1] = int(region.sum())
        for actor in occluders:
            region, texture = draw_actor(actor, t, (h, w))
            canvas[region] = texture[region]
            ids[region] = 0
        frames[t], masks[t] = canvas, ids
    visible = np.stack([(masks == k).sum(axis=(1, 2)) for k in range(1, n_obj + 1)], axis=1)  # T x O
    events = {}
    for k, actor in enumerate(targets, start=1):
        live = np.arange(n) >= actor.enter
        own, seen = drawn[:, k - 1], visible[:, k - 1]
        events[str(k)] = {"enter": actor.enter,
                          "out_of_frame": _spans(live & (own == 0)),
                          "occluded": _spans(live & (own > 0) & (seen < 0.5 * own)),
                          "hidden": _spans(live & (seen == 0))}
    return frames, masks, {"targets": events, "distractors": len(distractors), "occluders": len(occluders)}
