"""STRMN's post-processing (Nguyen & Li, sec. 3.4): remove false positives far from the object.

For each object, the connected blobs of its predicted mask are kept when they lie near where the
object was in the previous frame's prediction (within `margin` times that region's size, at least
`min_pixels`), and set to background otherwise. An object absent from the previous frame is left
alone (it may be coming back), and so is one none of whose blobs is near (it may have jumped):
the step only removes blobs when a near one exists to keep.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def remove_far_blobs(pred: np.ndarray, previous: np.ndarray, margin: float = 0.5, min_pixels: int = 8) -> np.ndarray:
    """pred, previous: H x W uint8 object ids (0 background) -> pred with far blobs removed."""
    if pred.shape != previous.shape:
        raise ValueError(f"prediction {pred.shape} and previous mask {previous.shape} differ in size")
    out = pred.copy()
    for obj in np.unique(pred).tolist():
        if obj == 0:
            continue
        before = previous == obj
        if not before.any():
            continue
        ys, xs = np.nonzero(before)
        extent = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
        radius = max(min_pixels, int(round(margin * extent)))
        # pixels within `radius` (chessboard) of the previous region: one max-filter, no loops
        near = ndimage.maximum_filter(before.astype(np.uint8), size=2 * radius + 1) > 0
        blobs, count = ndimage.label(pred == obj)
        if count <= 1:
            continue
        keep = np.unique(blobs[near & (blobs > 0)])
        if keep.size == 0:
            continue
        far = (blobs > 0) & ~np.isin(blobs, keep)
        out[far] = 0
    return out
