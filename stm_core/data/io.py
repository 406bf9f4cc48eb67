"""Image and palette-mask I/O with errors that name the file.

Masks are integer index maps `H x W` (0 = background, k = object k) stored as palette ('P') PNGs
in the DAVIS palette. One rule reads every mask (training, evaluation, segmentation, scoring):
palette and single-channel images ('P', 'L', '1', 16-bit, 'LA'/'PA' by their first channel) give
their pixel values; a mask holding only 0 and 255 is a binary mask (DAVIS-2016, saliency sets) and
reads as object 1; colour images are refused, since an object id cannot be told from a colour.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent. The message names the file."""


def davis_palette() -> list[int]:
    """The 256-colour DAVIS / PASCAL VOC palette (flat [r, g, b] * 256): index k -> colour of object k."""
    palette: list[int] = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):  # the VOC bit-interleaving: bits of c spread over r, g, b
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.extend((r, g, b))
    return palette


DAVIS_PALETTE: list[int] = davis_palette()

COLOUR_MODES = ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
FIX_RGB_MASK = (
    "masks must hold object ids (0 = background, k = object k): save it as a palette ('P') or "
    "single-channel ('L') PNG, e.g. with stm_core.data.write_index_mask(path, ids); a mask drawn in "
    "the DAVIS palette colours converts with stm_core.data.rgb_to_index_mask(rgb)"
)


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode an image: truncated files fail here, not in a worker later."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except UnidentifiedImageError as err:
        raise DataError(f"{path}: not a readable image ({what}): {err}") from err
    except (OSError, SyntaxError, ValueError) as err:  # PIL says "image file is truncated" etc.
        raise DataError(f"{path}: unreadable or truncated {what}: {err}") from err


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) from the header only (cheap)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: not a readable image: {err}") from err
    return h, w


def read_image(path: str | Path) -> np.ndarray:
    """An RGB frame as uint8 `H x W x 3` (grey and RGBA inputs are converted)."""
    im = _open(Path(path), "image")
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 `H x W x 3` -> float `3 x H x W` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def read_frame(path: str | Path) -> torch.Tensor:
    """An RGB frame as float `3 x H x W` in [0, 1] (the stm_core frame convention)."""
    return to_tensor(read_image(path))


def binary_to_ids(ids: np.ndarray) -> np.ndarray:
    """A binary 0/255 mask (DAVIS-2016 style) becomes 0/1; any other index map is returned unchanged."""
    if ids.size and ids.max() == 255 and not np.any((ids != 0) & (ids != 255)):
        return (ids == 255).astype(np.uint8)
    return ids


def mask_from_image(im: Image.Image, path: str | Path = "<mask>") -> np.ndarray:
    """Decode a loaded PIL mask into ids `H x W` uint8 (the module's one rule), naming the file on error."""
    if im.mode in COLOUR_MODES:
        raise DataError(f"{path}: mask has mode {im.mode!r}, a colour image, not object ids; {FIX_RGB_MASK}")
    arr = np.array(im.getchannel(0) if im.mode in ("LA", "PA") else im)
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a single-channel index mask, got array shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: mode {im.mode} holds {arr.dtype} values, not integer object ids")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise DataError(f"{path}: mask values outside 0..255 ({arr.min()}..{arr.max()})")
    return binary_to_ids(arr.astype(np.uint8))


def read_index_mask(path: str | Path) -> np.ndarray:
    """A palette/'L' PNG -> object ids `H x W` uint8 (0 = background)."""
    return mask_from_image(_open(Path(path), "mask"), path)


def index_mask_png(mask: np.ndarray | torch.Tensor, palette: list[int] | None = None) -> bytes:
    """Encode ids `H x W` as palette PNG bytes (deterministic: same ids -> same bytes)."""
    ids = _as_ids(mask)
    im = Image.fromarray(ids, mode="P")
    im.putpalette(palette if palette is not None else DAVIS_PALETTE)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_index_mask_png(data: bytes, where: str = "<bytes>") -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return mask_from_image(im, where)
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{where}: cannot decode mask: {err}") from err


def _as_ids(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be H x W, got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"mask ids must be in [0, 255], got [{mask.min()}, {mask.max()}]")
    return mask.astype(np.uint8)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON (indented, newline-terminated) atomically, as `atomic_write_bytes`."""
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def write_index_mask(path: str | Path, mask: np.ndarray | torch.Tensor, palette: list[int] | None = None) -> None:
    """Write ids `H x W` as a palette PNG (DAVIS palette unless given), atomically."""
    atomic_write_bytes(path, index_mask_png(mask, palette))


def encode_image(image: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> bytes:
    """uint8 `H x W x 3` -> JPEG or PNG bytes (deterministic for a given Pillow build)."""
    im = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB")
    buf = io.BytesIO()
    if fmt in ("jpeg", "jpg"):
        im.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    elif fmt == "png":
        im.save(buf, format="PNG", optimize=False)
    else:
        raise ValueError(f"unknown image format {fmt!r}; expected 'jpeg' or 'png'")
    return buf.getvalue()


def decode_image(data: bytes, where: str = "<bytes>") -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{where}: cannot decode image: {err}") from err


def write_image(path: str | Path, image: np.ndarray, quality: int = 95) -> None:
    """Write an RGB frame atomically; the format follows the suffix (.jpg/.jpeg or .png)."""
    path = Path(path)
    fmt = "png" if path.suffix.lower() == ".png" else "jpeg"
    atomic_write_bytes(path, encode_image(image, fmt, quality))


def rgb_to_index_mask(rgb: np.ndarray, palette: list[int] | None = None) -> np.ndarray:
    """Map an RGB mask drawn in palette colours (`H x W x 3`) to ids; unknown colours raise."""
    pal = np.asarray(palette if palette is not None else DAVIS_PALETTE, dtype=np.int64).reshape(-1, 3)
    rgb = np.asarray(rgb)[..., :3].astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    pal_codes = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    lookup = {int(c): i for i, c in reversed(list(enumerate(pal_codes)))}  # first index wins
    out = np.zeros(codes.shape, dtype=np.uint8)
    for code in np.unique(codes):
        if int(code) not in lookup:
            raise DataError(f"colour #{int(code):06x} is not in the palette; cannot map it to an object id")
        out[codes == code] = lookup[int(code)]
    return out
