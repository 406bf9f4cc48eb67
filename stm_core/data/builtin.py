"""Built-in offline datasets made from scikit-image's bundled sample images (no network, seeded).

- `write_builtin_images`: a static image + mask set (`images/<id>.jpg`, `masks/<id>.png`): textured
  objects (ellipses, stars, skimage random shapes, the horse silhouette, half of the logo) composited
  onto muted textures or natural images.
- `write_builtin_videos`: a small DAVIS-layout benchmark (train and val splits): 1-3 objects per
  sequence that travel far (several times their size), rotate, scale, change brightness, cross
  and occlude each other, and in some sequences enter mid-video; palette annotations on every frame.

Objects wear crops of the colourful sample images (or bold procedural patterns); backgrounds are
low-contrast tinted grey textures, so appearance matching can find objects while copying the
first mask cannot.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata
from skimage import draw, measure

from stm_core.data.augment import linear, translation, warp
from stm_core.data.io import DataError, atomic_write_bytes, encode_image, index_mask_png

# Bundled with scikit-image (no pooch download needed); checked on 0.26.
COLOUR_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "colorwheel", "immunohistochemistry",
                 "hubble_deep_field", "retina", "stereo_motorcycle")
GREY_TEXTURES = ("brick", "grass", "gravel", "camera", "moon", "coins", "page", "text", "clock", "cell")
SHAPES = ("ellipse", "star", "random", "horse", "logo")
PATTERNS = ("stripes", "checker", "dots")
PATCH = 96  # side of the square object patch (texture + shape) before it is warped into a frame


@cache
def sample_image(name: str) -> np.ndarray:
    """A scikit-image sample as uint8 `H x W x 3` (grey ones stacked)."""
    loader = getattr(skdata, name, None)
    if loader is None:
        raise DataError(f"skimage.data.{name} does not exist in this scikit-image version")
    try:
        img = loader()
    except Exception as err:  # missing optional data (pooch) must fail loudly, never change the dataset
        raise DataError(f"skimage.data.{name}() is not available offline: {err}") from err
    if isinstance(img, tuple):
        img = img[0]
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (255 * (img.astype(np.float64) / max(float(img.max()), 1e-9))).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = np.ascontiguousarray(img[..., :3])
    img.setflags(write=False)  # cached and shared: nobody may draw on it
    return img


def _resize(img: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    mode = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), mode)).copy()


def _crop(img: np.ndarray, frac: float, rng: np.random.Generator) -> np.ndarray:
    """A random square crop whose side is `frac` of the image's shorter side."""
    h, w = img.shape[:2]
    side = max(8, int(frac * min(h, w)))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return img[y:y + side, x:x + side]


def _saturated_colour(rng: np.random.Generator) -> np.ndarray:
    hue = rng.uniform(0, 6)
    c = np.clip(np.abs((hue + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)  # HSV(hue, 1, 1) -> RGB
    return (40 + 215 * c).astype(np.float64)


def object_texture(rng: np.random.Generator, size: int = PATCH) -> np.ndarray:
    """A colourful texture patch `size x size x 3`: a crop of a colour sample image or a bold pattern."""
    if rng.random() < 0.7:
        name = COLOUR_IMAGES[int(rng.integers(len(COLOUR_IMAGES)))]
        return _resize(_crop(sample_image(name), rng.uniform(0.25, 0.6), rng), (size, size))
    kind = PATTERNS[int(rng.integers(len(PATTERNS)))]
    a, b = _saturated_colour(rng), _saturated_colour(rng)
    yy, xx = np.mgrid[0:size, 0:size]
    period = rng.uniform(8, 20)
    angle = rng.uniform(0, math.pi)
    if kind == "stripes":
        on = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) > 0
    elif kind == "checker":
        on = ((xx // (period / 1.5)).astype(int) + (yy // (period / 1.5)).astype(int)) % 2 == 0
    else:
        on = ((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < (period / 3.2) ** 2
    return np.where(on[..., None], a, b).astype(np.uint8)


def shape_mask(kind: str, rng: np.random.Generator, size: int = PATCH) -> np.ndarray:
    """A boolean silhouette filling most of a `size x size` patch."""
    m = np.zeros((size, size), bool)
    c = size / 2
    if kind == "ellipse":
        ry, rx = c * rng.uniform(0.55, 0.95), c * rng.uniform(0.55, 0.95)
        rr, cc = draw.ellipse(c, c, ry, rx, shape=m.shape, rotation=rng.uniform(0, math.pi))
        m[rr, cc] = True
    elif kind == "star":
        n = int(rng.integers(4, 8))
        angles = np.arange(2 * n) * math.pi / n + rng.uniform(0, math.pi)
        radii = np.where(np.arange(2 * n) % 2 == 0, 0.95, rng.uniform(0.4, 0.6)) * c
        rr, cc = draw.polygon(c + radii * np.sin(angles), c + radii * np.cos(angles), shape=m.shape)
        m[rr, cc] = True
    elif kind == "random":
        img, _ = draw.random_shapes((size, size), max_shapes=1, min_size=int(size * 0.6), channel_axis=None,
                                    rng=int(rng.integers(2**31)), allow_overlap=False)
        m = img < 255
    elif kind == "horse":
        m = _fit(~skdata.horse(), size)
    elif kind == "logo":
        logo = sample_image("logo")
        labels = measure.label(logo.min(-1) < 200)
        m = _fit(labels == 1 + int(rng.integers(labels.max())), size)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    if m.sum() < 0.1 * size * size:  # degenerate draw: fall back to a disc
        rr, cc = draw.disk((c, c), c * 0.8, shape=m.shape)
        m[rr, cc] = True
    return m


def _fit(mask: np.ndarray, size: int) -> np.ndarray:
    """Crop a silhouette to its box and scale it into a square patch, keeping its aspect."""
    ys, xs = np.nonzero(mask)
    mask = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    scale = (size - 2) / max(mask.shape)
    h, w = max(1, round(mask.shape[0] * scale)), max(1, round(mask.shape[1] * scale))
    small = _resize(mask.astype(np.uint8) * 255, (h, w), nearest=True) > 127
    out = np.zeros((size, size), bool)
    y, x = (size - h) // 2, (size - w) // 2
    out[y:y + h, x:x + w] = small
    return out


def background_texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A muted, tinted grey texture `H x W x 3` (low contrast, low saturation)."""
    name = GREY_TEXTURES[int(rng.integers(len(GREY_TEXTURES)))]
    grey = sample_image(name)[..., 0].astype(np.float64) / 255.0
    h, w = grey.shape
    frac = rng.uniform(0.4, 0.8)
    ch, cw = int(h * frac), int(w * frac)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    grey = _resize((grey[y:y + ch, x:x + cw] * 255).astype(np.uint8), size).astype(np.float64) / 255.0
    tint = rng.uniform(0.35, 0.65) + rng.uniform(-0.06, 0.06, size=3)  # nearly grey
    contrast = rng.uniform(0.3, 0.5)
    out = tint[None, None, :] + (grey[..., None] - grey.mean()) * contrast
    return np.clip(out * 255, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- static image set


@dataclass
class BuiltinImagesConfig:
    count: int = 200  # number of image + mask pairs
    size: int = 160  # image side in pixels (square)
    max_objects: int = 2  # objects per image: uniform in [1, max_objects]
    natural_background: float = 0.3  # probability of a colour photo background instead of a texture


def make_builtin_image(cfg: BuiltinImagesConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = cfg.size
    if rng.random() < cfg.natural_background:
        name = COLOUR_IMAGES[int(rng.integers(len(COLOUR_IMAGES)))]
        canvas = _resize(_crop(sample_image(name), rng.uniform(0.5, 1.0), rng), (s, s))
    else:
        canvas = background_texture(rng, (s, s))
    ids = np.zeros((s, s), np.uint8)
    for k in range(1, int(rng.integers(1, cfg.max_objects + 1)) + 1):
        shape = shape_mask(SHAPES[int(rng.integers(len(SHAPES)))], rng)
        texture = object_texture(rng)
        side = rng.uniform(0.3, 0.6) * s
        m = (translation(*rng.uniform(side / 2, s - side / 2, size=2))
             @ linear(rng.uniform(-180, 180), 0.0, side / PATCH) @ translation(-PATCH / 2, -PATCH / 2))
        region = warp(shape.astype(np.uint8) * 255, m, (s, s), nearest=True) > 127
        canvas[region] = warp(texture, m, (s, s))[region]
        ids[region] = k
    return canvas, ids


def write_builtin_images(root: str | Path, cfg: BuiltinImagesConfig, seed: int) -> None:
    """`<root>/images/%05d.jpg` + `<root>/masks/%05d.png` (ids; images with no visible object are redrawn)."""
    root = Path(root)
    for i in range(cfg.count):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 1, i]))
        image, ids = make_builtin_image(cfg, rng)
        while ids.max() == 0:
            image, ids = make_builtin_image(cfg, rng)
        atomic_write_bytes(root / "images" / f"{i:05d}.jpg", encode_image(image, "jpeg", 95))
        atomic_write_bytes(root / "masks" / f"{i:05d}.png", index_mask_png(ids))
    _write_json(root / "builtin.json", {"kind": "builtin-images", "seed": seed, "config": asdict(cfg)})


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
