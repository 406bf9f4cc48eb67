"""Sequence and dataset scores of the DAVIS-2017 semi-supervised protocol, from in-memory masks.

The first and last frames are not scored; per object Mean, Recall (> 0.5) and Decay (4 bins) of J
and F; a sequence's and the dataset's scores are means over their objects; J&F = (J + F) / 2.
Objects are the ids present in the ground truth (any frame); in the ground truth, 255 (next to
other ids) is DAVIS's void label and counts as background, as in the official code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from stm_core.scoring.masks import MetricError, check_index_map
from stm_core.scoring.measures import BOUND_TH, frame_scores, statistics

VOID = 255
KEYS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


@dataclass
class SequenceScores:
    """Per-frame scores of one sequence, scored frames only (first and last left out)."""

    name: str
    object_ids: list[int]
    frames: list[str]  # names of the scored frames, T of them
    J: np.ndarray  # O x T
    F: np.ndarray  # O x T

    def object_key(self, obj: int) -> str:
        return f"{self.name}_{obj}"

    def per_frame(self) -> dict[str, dict[str, list]]:
        """{"<seq>_<id>": {"frames": [...], "J": [...], "F": [...]}} (the fixtures' per_frame layout)."""
        return {self.object_key(o): {"frames": list(self.frames), "J": self.J[i].tolist(), "F": self.F[i].tolist()}
                for i, o in enumerate(self.object_ids)}



def _ids(mask: np.ndarray) -> np.ndarray:
    """Sorted ids present in a mask (bincount: much faster than np.unique for small ids)."""
    if mask.size == 0:
        return np.zeros(0, dtype=np.int64)
    if mask.max() > 65535:
        return np.unique(mask)
    return np.flatnonzero(np.bincount(mask.ravel()))


def _object_ids(gt: Sequence[np.ndarray]) -> list[int]:
    present: set[int] = set()
    for g in gt:
        present.update(_ids(g).tolist())
    return sorted(int(v) for v in present if v not in (0, VOID))


def _unknown_ids(pred: np.ndarray, known: np.ndarray, contiguous: bool) -> list[int]:
    """Ids in pred that `known` (bool per id) does not allow; with contiguous ids the max tells."""
    top = int(pred.max()) if pred.size else 0
    if top < known.size and contiguous:
        return []
    return [int(v) for v in _ids(pred) if v >= known.size or not known[v]]


def evaluate_sequence(gt: Sequence[np.ndarray], pred: Sequence[np.ndarray | None], *, name: str = "sequence",
                      frame_names: Sequence[str] | None = None, sources: Sequence[str] | None = None,
                      bound_th: float = BOUND_TH) -> SequenceScores:
    """Per-object, per-frame J and F of one sequence.

    gt: T masks H x W (integer ids, the whole sequence including first and last frame);
    pred: T masks H x W; pred[0] may be None (the first frame is given, never scored; later ones are
    all checked, the last is not scored). frame_names: names for the frames (default 00000, 00001, ...);
    sources: how to name each prediction in error messages (e.g. its file; default "<name>/<frame>").
    """
    n = len(gt)
    frame_names = [f"{i:05d}" for i in range(n)] if frame_names is None else list(frame_names)
    sources = [f"{name}/{f}" for f in frame_names] if sources is None else list(sources)
    if len(frame_names) != n or len(sources) != n:
        raise MetricError(f"{name}: {n} ground-truth frames but {len(frame_names)} names / {len(sources)} sources")
    if n < 3:
        raise MetricError(f"{name}: {n} ground-truth frames; at least 3 are needed (first and last are not scored)")
    if len(pred) != n:
        raise MetricError(f"{name}: {len(pred)} predicted frames for {n} ground-truth frames")
    gt = [check_index_map(g, f"{name}/{f} (ground truth)") for g, f in zip(gt, frame_names)]
    objects = _object_ids(gt)
    if not objects:
        raise MetricError(f"{name}: the ground truth holds no object (only background)")
    # ids a prediction may hold: background and the ground truth's objects
    known = np.zeros(max(objects) + 1, dtype=bool)
    known[[0, *objects]] = True
    contiguous = objects == list(range(1, len(objects) + 1))  # then p.max() alone tells unknown ids
    J = np.empty((len(objects), n - 2))
    F = np.empty((len(objects), n - 2))
    for t in range(1, n):
        frame = pred[t]
        if frame is None:
            raise MetricError(f"{sources[t]}: prediction missing (every frame after the first needs one)")
        p = check_index_map(frame, sources[t])
        g = gt[t]
        if p.shape != g.shape:
            raise MetricError(f"{sources[t]}: prediction size {p.shape[1]}x{p.shape[0]} (W x H) differs "
                              f"from the ground truth's {g.shape[1]}x{g.shape[0]}")
        bad = _unknown_ids(p, known, contiguous)
        if bad:
            raise MetricError(f"{sources[t]}: unknown object id(s) {bad}; the ground truth of {name} "
                              f"has objects {objects}")
        if t < n - 1:  # the last frame is checked but not scored
            J[:, t - 1], F[:, t - 1] = frame_scores(g, p, objects, bound_th)
    return SequenceScores(name=name, object_ids=objects, frames=frame_names[1:-1], J=J, F=F)


def _stats(j: np.ndarray, f: np.ndarray) -> dict[str, float]:
    jm, jr, jd = statistics(j)
    fm, fr, fd = statistics(f)
    return {"J&F-Mean": (jm + fm) / 2, "J-Mean": jm, "J-Recall": jr, "J-Decay": jd,
            "F-Mean": fm, "F-Recall": fr, "F-Decay": fd}


def score_objects(scores: SequenceScores) -> dict[str, dict[str, float]]:
    """{"<seq>_<id>": {J&F-Mean, J-Mean, J-Recall, J-Decay, F-Mean, F-Recall, F-Decay}} for one sequence."""
    return {scores.object_key(o): _stats(scores.J[i], scores.F[i]) for i, o in enumerate(scores.object_ids)}


def _mean_over(objects: Iterable[dict[str, float]]) -> dict[str, float]:
    rows = list(objects)
    out = {k: float(np.mean([r[k] for r in rows])) for k in KEYS if k != "J&F-Mean"}
    return {"J&F-Mean": (out["J-Mean"] + out["F-Mean"]) / 2, **out}


def summarize(sequences: Iterable[SequenceScores]) -> dict:
    """Dataset scores: each key is the mean over all objects of all sequences (official aggregation),
    with "sequences" (mean over each sequence's objects) and "objects" (one entry per object)."""
    per_seq: dict[str, dict[str, float]] = {}
    per_obj: dict[str, dict[str, float]] = {}
    for s in sequences:
        if s.name in per_seq:
            raise MetricError(f"sequence {s.name!r} scored twice")
        objs = score_objects(s)
        per_seq[s.name] = _mean_over(objs.values())
        per_obj.update(objs)
    if not per_obj:
        raise MetricError("no sequence to score")
    return {**_mean_over(per_obj.values()), "sequences": per_seq, "objects": per_obj}


def score_sequences(gt: Mapping[str, Sequence[np.ndarray]], pred: Mapping[str, Sequence[np.ndarray | None]],
                    bound_th: float = BOUND_TH) -> dict:
    """In-memory `score_folders`: {sequence: T masks} for gt and pred (same names) -> `summarize` dict."""
    missing = sorted(set(gt) - set(pred))
    if missing:
        raise MetricError(f"no prediction for sequence(s) {missing}")
    return summarize(evaluate_sequence(gt[name], pred[name], name=name, bound_th=bound_th) for name in gt)
