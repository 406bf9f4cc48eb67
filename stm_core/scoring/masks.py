"""Index masks for scoring: read from PNG files or checked in memory (H x W maps of object ids).

A binary 0/255 mask (DAVIS-2016 style) is read as object 1; colour masks are refused, since an
object id cannot be told from a colour reliably. Bad input is a `MetricError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stm_core.data.io import DataError, binary_to_ids
from stm_core.data.io import read_index_mask as read_mask


class MetricError(ValueError):
    """Bad input to the metric (missing frame, size mismatch, unknown object id, unreadable mask)."""


def read_index_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask PNG as an H x W uint8 index map with the one rule of `stm_core.data.io`
    (0/255 reads as 0/1, colour refused); bad input is a `MetricError` naming the file."""
    try:
        return read_mask(Path(path))
    except DataError as exc:
        raise MetricError(str(exc)) from exc


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
    return binary_to_ids(mask)

