"""The DAVIS-2017 per-frame measures: J (region IoU), F (boundary F-measure) and their statistics.

Same definitions as the official evaluation (davisvideochallenge/davis2017-evaluation: `db_eval_iou`,
`db_eval_boundary`/`f_measure`, `_seg2bmap`, `utils.db_statistics`); `stm_core.scoring.sequences` builds the
sequence and dataset scores on top. Made fast by working inside each object's bounding box and by
matching boundary pixels with a k-d tree instead of dilating whole images (same numbers, see `_matches`).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

BOUND_TH = 0.008  # boundary tolerance as a fraction of the image diagonal (official default)
RECALL_TH = 0.5  # a frame "recalls" the object when its score is above this
N_DECAY_BINS = 4


def jaccard(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Region similarity J per mask. gt, pred: N x H x W (or H x W) bool -> N floats; 1 where both are empty."""
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
    pixel never is one (D. Martin's seg2bmap, as in the official code). So a mask covering the whole
    image has no boundary at all.
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


def _matches(points: np.ndarray, others: np.ndarray, radius: float) -> int:
    """How many of `points` (n x 2 pixel coordinates) lie within `radius` of one of `others`.

    The official code counts points inside binary_dilation(others, skimage.morphology.disk(radius));
    that disk holds exactly the offsets with dx^2 + dy^2 <= radius^2, so a point is in the dilation
    exactly when its Euclidean distance to the nearest other point is <= radius. Squared distances are
    integers and sqrt is correctly rounded, so the float comparison below is exact.
    """
    dist, _ = cKDTree(others).query(points, k=1, distance_upper_bound=radius + 0.5)
    return int(np.count_nonzero(dist <= radius))


def _f_from_boundaries(gt_b: np.ndarray, fg_b: np.ndarray, radius: float) -> float:
    """F from the two boundary maps (H x W bool), with the official empty cases."""
    gt_pts = np.argwhere(gt_b)
    fg_pts = np.argwhere(fg_b)
    n_gt, n_fg = len(gt_pts), len(fg_pts)
    if n_fg == 0 or n_gt == 0:
        # both empty: precision = recall = 1; one empty: one of them is 0 -> F = 0
        return 1.0 if n_fg == n_gt else 0.0
    precision = _matches(fg_pts, gt_pts, radius) / float(n_fg)
    recall = _matches(gt_pts, fg_pts, radius) / float(n_gt)
    total = precision + recall
    return 0.0 if total == 0 else 2 * precision * recall / total


def _grow(box: tuple[int, int, int, int], height: int, width: int) -> tuple[slice, slice]:
    """Crop for a mask's box (y0, y1, x0, x1; stop exclusive): one more pixel on every side, clipped.

    seg2bmap of the crop then equals the full image's boundary map inside the crop (the row/column
    before the box can be boundary pixels, the extra row/column after it keeps the crop's own last
    row/column rule from firing on mask pixels) and no boundary pixel lies outside it.
    """
    y0, y1, x0, x1 = box
    return slice(max(y0 - 1, 0), min(y1 + 1, height)), slice(max(x0 - 1, 0), min(x1 + 1, width))


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def boundary_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> np.ndarray:
    """Boundary F-measure per mask. gt, pred: N x H x W (or H x W) bool -> N floats (or a float).

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
    h, w = gt.shape[-2:]
    radius = bound_pixels(h, w, bound_th)
    out = np.ones(gt.shape[0], dtype=np.float64)
    for i in range(gt.shape[0]):
        box = _box(gt[i] | pred[i])
        if box is not None:
            crop = _grow(box, h, w)
            out[i] = _f_from_boundaries(seg2bmap(gt[i][crop]), seg2bmap(pred[i][crop]), radius)
    return out


def frame_scores(gt: np.ndarray, pred: np.ndarray, objects: list[int],
                 bound_th: float = BOUND_TH) -> tuple[np.ndarray, np.ndarray]:
    """J and F of each object in one frame. gt, pred: H x W integer id maps -> (O floats, O floats).

    Works inside the bounding box of each object's two masks, so small objects cost little.
    """
    h, w = gt.shape
    radius = bound_pixels(h, w, bound_th)
    j = np.ones(len(objects))
    f = np.ones(len(objects))
    for i, k in enumerate(objects):
        g, p = gt == k, pred == k
        box = _box(g | p)
        if box is None:
            continue  # both empty: J = F = 1
        crop = _grow(box, h, w)
        g, p = g[crop], p[crop]
        j[i] = np.count_nonzero(g & p) / np.count_nonzero(g | p)
        f[i] = _f_from_boundaries(seg2bmap(g), seg2bmap(p), radius)
    return j, f


def decay_bins(n: int, n_bins: int = N_DECAY_BINS) -> list[slice]:
    """The official decay bins over n scored frames: round(linspace(1, n, n_bins + 1)) - 1 gives the
    bin edges, and bin i spans edges[i]..edges[i + 1] inclusive (neighbouring bins share a frame).
    (The official code casts the edges to uint8, which wraps above 256 frames; here they do not.)"""
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
