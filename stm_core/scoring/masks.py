"""Index masks for scoring: read from PNG files or checked in memory (H x W maps of object ids).

A binary 0/255 mask (DAVIS-2016 style) is read as object 1; colour masks are refused, since an
object id cannot be told from a colour reliably. Bad input is a `MetricError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


class MetricError(ValueError):
    """Bad input to the metric (missing frame, size mismatch, unknown object id, unreadable mask)."""



def normalize_mask(mask: np.ndarray) -> np.ndarray:
    """Index map from a mask array: a binary 0/255 mask (DAVIS-2016 style) becomes 0/1, others unchanged."""
    mask = np.asarray(mask)
    if mask.size and mask.max() == 255 and not np.any((mask != 0) & (mask != 255)):
        return (mask == 255).astype(np.uint8)
    return mask


def read_index_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask PNG as an H x W uint8 index map (0 = background, k = object k).

    Palette ('P') and greyscale ('L', '1', 16-bit) images give their pixel values; a 0/255 mask gives 0/1.
    Colour (RGB) masks are refused: an object id cannot be told from a colour reliably.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
                raise MetricError(f"{path}: a {mode} colour image, not an index mask; save masks as "
                                  "palette (indexed, mode 'P') PNGs whose pixel value is the object id")
            arr = np.array(im.getchannel(0) if mode in ("LA", "PA") else im)
    except MetricError:
        raise
    except (OSError, ValueError) as exc:
        raise MetricError(f"{path}: cannot read mask: {exc}") from exc
    if arr.ndim != 2:
        raise MetricError(f"{path}: expected a single-channel index mask, got array shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise MetricError(f"{path}: mode {mode} holds {arr.dtype} values, not integer object ids")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise MetricError(f"{path}: mask values outside 0..255 ({arr.min()}..{arr.max()})")
    return normalize_mask(arr.astype(np.uint8))


def check_index_map(mask: np.ndarray, source: str) -> np.ndarray:
    """Check an in-memory mask is an H x W map of non-negative integer ids; 0/255 becomes 0/1."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise MetricError(f"{source}: expected an H x W index mask, got shape {mask.shape}")
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        raise MetricError(f"{source}: expected integer object ids, got dtype {mask.dtype}")
    if mask.size and mask.min() < 0:
        raise MetricError(f"{source}: negative object id {mask.min()}")
    return normalize_mask(mask)

