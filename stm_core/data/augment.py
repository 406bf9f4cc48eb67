"""Random affine warps and colour jitter, pure numpy + Pillow, deterministic given a numpy Generator.

Affines are 3x3 matrices that map source pixel coordinates (x, y) to output coordinates; `warp`
hands Pillow the inverse. Ranges are dataclasses so params.yaml can hold them directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


def check_range(name: str, value: list[float], low: float = 0.0, allow_low: bool = False) -> None:
    """A `[min, max]` setting: two numbers with low < min <= max (low <= min with `allow_low`)."""
    ok = len(value) == 2 and (value[0] >= low if allow_low else value[0] > low) and value[0] <= value[1]
    if not ok:
        bound = ">=" if allow_low else ">"
        raise ValueError(f"{name} must be [min, max] with min {bound} {low:g} and min <= max, got {value}")


@dataclass
class AffineRange:
    """Uniform ranges of one level of random affine (per clip, or per frame around the clip's)."""

    rotation: float = 0.0  # degrees, uniform in [-rotation, rotation]
    shear: float = 0.0  # degrees, uniform in [-shear, shear] (x-shear)
    zoom: list[float] = field(default_factory=lambda: [1.0, 1.0])  # [min, max] scale, log-uniform
    translate: float = 0.0  # fraction of the output size, uniform in [-t, t] per axis
    hflip: float = 0.0  # probability of a horizontal flip
    vflip: float = 0.0  # probability of a vertical flip

    def __post_init__(self) -> None:
        check_range("zoom", self.zoom)


@dataclass
class ColorJitter:
    """Random colour change; each factor is uniform in [1 - x, 1 + x] (hue: a rotation of x * 180 deg)."""

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0


def translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def linear(rotation_deg: float = 0.0, shear_deg: float = 0.0, scale: float = 1.0,
           flip_x: bool = False, flip_y: bool = False) -> np.ndarray:
    """Rotation . shear . scale . flip about the origin."""
    t = math.radians(rotation_deg)
    rot = np.array([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0], [0.0, 0.0, 1.0]])
    shear = np.array([[1.0, math.tan(math.radians(shear_deg)), 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    flip = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, 1.0])
    return rot @ shear @ np.diag([scale, scale, 1.0]) @ flip


def sample_affine(r: AffineRange, rng: np.random.Generator, center: tuple[float, float],
                  size: tuple[int, int], base_scale: float = 1.0) -> np.ndarray:
    """A random affine that maps `center` (x, y) to the middle of an output of `size` (H, W), then
    shifts by the random translation. Draw order is fixed so the result depends only on the rng."""
    h, w = size
    rot = rng.uniform(-r.rotation, r.rotation)
    shear = rng.uniform(-r.shear, r.shear)
    zoom = math.exp(rng.uniform(math.log(r.zoom[0]), math.log(r.zoom[1])))
    tx, ty = rng.uniform(-r.translate, r.translate, size=2)
    flip_x = bool(rng.random() < r.hflip)
    flip_y = bool(rng.random() < r.vflip)
    return (translation(w / 2 + tx * w, h / 2 + ty * h)
            @ linear(rot, shear, base_scale * zoom, flip_x, flip_y)
            @ translation(-center[0], -center[1]))


def about_center(matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Conjugate an affine built for the output centre, so it perturbs an already placed layer."""
    h, w = size
    return translation(w / 2, h / 2) @ matrix @ translation(-w / 2, -h / 2)


def warp(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int], nearest: bool = False,
         fill: int | tuple[int, ...] = 0) -> np.ndarray:
    """Warp `image` (`h x w [x 3]` uint8) by `matrix` (source -> output) into an output of `size` (H, W)."""
    # Pillow treats pixel i as the span [i, i + 1) on both sides, as these matrices do.
    inv = np.linalg.inv(matrix)
    coeffs = tuple(float(v) for v in inv[:2].reshape(-1))
    im = Image.fromarray(image)
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    out = im.transform((size[1], size[0]), Image.Transform.AFFINE, coeffs, resample=resample, fillcolor=fill)
    return np.asarray(out).copy()


def _hue_matrix(angle: float) -> np.ndarray:
    """Rotate chroma in YIQ space by `angle` radians (a cheap, linear hue shift)."""
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return np.linalg.inv(to_yiq) @ rot @ to_yiq


@dataclass
class JitterDraw:
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0  # radians


def sample_jitter(j: ColorJitter, rng: np.random.Generator) -> JitterDraw:
    return JitterDraw(
        brightness=rng.uniform(1 - j.brightness, 1 + j.brightness),
        contrast=rng.uniform(1 - j.contrast, 1 + j.contrast),
        saturation=rng.uniform(1 - j.saturation, 1 + j.saturation),
        hue=rng.uniform(-j.hue, j.hue) * math.pi,
    )


def apply_jitter(image: np.ndarray, *draws: JitterDraw) -> np.ndarray:
    """Apply colour draws in order to uint8 `H x W x 3`; returns uint8.

    Each step is affine in RGB (contrast pivots on the image mean), so the chain folds into one
    3x3 matrix and offset, tracked through the per-channel mean: one pass over the pixels.
    """
    grey = np.array([0.299, 0.587, 0.114])
    a, off = np.eye(3), np.zeros(3)
    mean = image[::2, ::2].reshape(-1, 3).mean(0, dtype=np.float64)  # contrast pivot: a subsample is plenty
    for d in draws:
        a, off = d.brightness * a, d.brightness * off
        m = float((a @ mean + off).mean())  # the current image's mean intensity
        a, off = d.contrast * a, d.contrast * off + (1 - d.contrast) * m
        sat = d.saturation * np.eye(3) + (1 - d.saturation) * np.outer(np.ones(3), grey)
        a, off = sat @ a, sat @ off
        if d.hue:
            hue = _hue_matrix(d.hue)
            a, off = hue @ a, hue @ off
    x = image.reshape(-1, 3).astype(np.float32) @ a.T.astype(np.float32) + off.astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(image.shape)
