"""The DAVIS-2017 per-frame measures: J (region IoU), F (boundary F-measure) and their statistics.

Same definitions as the official evaluation (davisvideochallenge/davis2017-evaluation,
`db_eval_iou`, `db_eval_boundary`/`f_measure`, `_seg2bmap`, `utils.db_statistics`), vectorised over
objects: each function takes a stack `N x H x W` of binary masks (one per object) and returns `N` scores.
`stm_core.metrics` builds the sequence and dataset scores on top of these.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BOUND_TH = 0.008  # boundary tolerance as a fraction of the image diagonal (official default)
RECALL_TH = 0.5  # a frame "recalls" the object when its score is above this
N_DECAY_BINS = 4


def jaccard(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Region similarity J per mask. gt, pred: N x H x W bool -> N floats; 1 where both are empty."""
    inter = np.count_nonzero(gt & pred, axis=(-2, -1))
    union = np.count_nonzero(gt | pred, axis=(-2, -1))
    return jaccard_from_counts(inter, union)


def jaccard_from_counts(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """J from pixel counts: inter / union, 1 where the union is empty (both masks empty)."""
    inter = np.asarray(inter, dtype=np.float64)
    union = np.asarray(union, dtype=np.float64)
    empty = union == 0
    return np.where(empty, 1.0, inter / np.where(empty, 1.0, union))


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """1-pixel-wide boundary map of binary masks, shifted half a pixel towards the origin.

    seg: ... x H x W bool -> same shape bool. A pixel is a boundary pixel when it differs from its
    east, south or south-east neighbour (outside the image counts as background); in the last row
    only the east neighbour counts, in the last column only the south one, and the bottom-right
    pixel never is a boundary (as in D. Martin's seg2bmap used by the official code).
    """
    seg = np.asarray(seg, dtype=bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[..., :, :-1] = seg[..., :, 1:]
    s[..., :-1, :] = seg[..., 1:, :]
    se[..., :-1, :-1] = seg[..., 1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[..., -1, :] = seg[..., -1, :] ^ e[..., -1, :]
    b[..., :, -1] = seg[..., :, -1] ^ s[..., :, -1]
    b[..., -1, -1] = False
    return b


def bound_pixels(height: int, width: int, bound_th: float = BOUND_TH) -> float:
    """Tolerance radius in pixels: bound_th itself when >= 1, else ceil(bound_th x image diagonal)."""
    if bound_th >= 1:
        return float(bound_th)
    return float(np.ceil(bound_th * np.linalg.norm((height, width))))


def _matched(source: np.ndarray, target: np.ndarray, radius: float) -> int:
    """How many `source` boundary pixels lie within the disk of `radius` around some `target` pixel.

    Equals sum(source & binary_dilation(target, skimage.morphology.disk(radius))): the disk holds the
    offsets with dx^2 + dy^2 <= radius^2, so a pixel is in the dilation exactly when its Euclidean
    distance to the nearest target pixel is <= radius. The exact distance transform is much faster
    than a 17 x 17 dilation, and both maps are cropped to their joint bounding box (every target pixel
    lies inside it, so distances there are unchanged).
    """
    rows = np.flatnonzero((source | target).any(axis=1))
    cols = np.flatnonzero((source | target).any(axis=0))
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    src, tgt = source[crop], target[crop]
    dist = ndimage.distance_transform_edt(~tgt)  # distance to the nearest target pixel
    return int(np.count_nonzero(dist[src] <= radius))


def boundary_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> np.ndarray:
    """Boundary F-measure per mask. gt, pred: N x H x W bool -> N floats.

    Precision = predicted boundary pixels within the tolerance of the true boundary / all predicted
    boundary pixels; recall likewise the other way round. Empty cases as in the official code:
    no predicted and no true boundary -> F = 1; only one of them empty -> F = 0.
    """
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"boundary_f: shapes differ: {gt.shape} vs {pred.shape}")
    if gt.ndim == 2:
        return boundary_f(gt[None], pred[None], bound_th)[0]
    radius = bound_pixels(gt.shape[-2], gt.shape[-1], bound_th)
    gt_b = seg2bmap(gt)
    fg_b = seg2bmap(pred)
    n_gt = np.count_nonzero(gt_b, axis=(-2, -1))
    n_fg = np.count_nonzero(fg_b, axis=(-2, -1))
    out = np.empty(gt.shape[0], dtype=np.float64)
    for i in range(gt.shape[0]):
        if n_fg[i] == 0 or n_gt[i] == 0:
            out[i] = 1.0 if n_fg[i] == n_gt[i] else 0.0
            continue
        precision = _matched(fg_b[i], gt_b[i], radius) / float(n_fg[i])
        recall = _matched(gt_b[i], fg_b[i], radius) / float(n_gt[i])
        total = precision + recall
        out[i] = 0.0 if total == 0 else 2 * precision * recall / total
    return out


def decay_bins(n: int, n_bins: int = N_DECAY_BINS) -> list[slice]:
    """The official decay bins over n scored frames: round(linspace(1, n, n_bins + 1)) - 1 gives the
    bin edges, and bin i spans edges[i]..edges[i + 1] inclusive (neighbouring bins share a frame)."""
    edges = (np.round(np.linspace(1, n, n_bins + 1) + 1e-10) - 1).astype(np.int64)
    return [slice(int(edges[i]), int(edges[i + 1]) + 1) for i in range(n_bins)]


def statistics(values: np.ndarray) -> tuple[float, float, float]:
    """Mean, Recall (fraction of frames > 0.5) and Decay (first bin mean - last bin mean) of the
    per-frame scores of one object, NaN frames left out of the means (official `db_statistics`)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"statistics needs a non-empty 1-D array of per-frame scores, got shape {values.shape}")
    valid = ~np.isnan(values)
    mean = float(np.mean(values[valid])) if valid.any() else float("nan")
    recall = float(np.mean(values > RECALL_TH))  # a NaN frame counts as not recalled, as officially
    bins = [values[b] for b in decay_bins(values.size)]
    first, last = (b[~np.isnan(b)] for b in (bins[0], bins[-1]))
    decay = float(first.mean() - last.mean()) if first.size and last.size else float("nan")
    return mean, recall, decay
