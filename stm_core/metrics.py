"""Score predicted masks against ground truth with the DAVIS-2017 J and F measures.

`stm score --gt GT_DIR --pred PRED_DIR [--sequences a b ...] [--json OUT]`; each directory holds
`<sequence>/<frame>.png` index masks (palette PNGs: pixel value = object id; DAVIS-2016 style 0/255
masks are read as object 1). Semi-supervised protocol of the official DAVIS-2017 evaluation: the
first and last frames are not scored; per object Mean, Recall (> 0.5) and Decay (4 bins) of J and
F; a sequence's and the dataset's scores are means over their objects; J&F = (J + F) / 2.

Objects are the ids present in the ground truth (any frame; in DAVIS all appear in the first). A
prediction must exist for every frame after the first, have the ground truth's size, and hold only
those ids: anything else is a `MetricError` naming the file. In the ground truth, 255 (next to other
ids) is DAVIS's void label and counts as background, as in the official code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stm_core.data.io import atomic_write_bytes
from stm_core.measures import BOUND_TH, frame_scores, statistics

VOID = 255
KEYS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


class MetricError(ValueError):
    """Bad input to the metric (missing frame, size mismatch, unknown object id, unreadable mask)."""


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


# ----------------------------------------------------------------------------- reading masks

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
            if mode in ("LA", "PA"):
                im = im.getchannel(0)
            arr = np.array(im)
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


# ----------------------------------------------------------------------------- scoring

def _index_map(mask: np.ndarray, source: str) -> np.ndarray:
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
    gt = [_index_map(g, f"{name}/{f} (ground truth)") for g, f in zip(gt, frame_names)]
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
        if pred[t] is None:
            raise MetricError(f"{sources[t]}: prediction missing (every frame after the first needs one)")
        p = _index_map(pred[t], sources[t])
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


# ----------------------------------------------------------------------------- folders

def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.png") if p.is_file())


def evaluate_folder(gt_seq_dir: str | os.PathLike, pred_seq_dir: str | os.PathLike, name: str | None = None,
                    bound_th: float = BOUND_TH) -> SequenceScores:
    """Score one sequence: `gt_seq_dir/<frame>.png` against `pred_seq_dir/<frame>.png`."""
    gt_dir, pred_dir = Path(gt_seq_dir), Path(pred_seq_dir)
    name = gt_dir.name if name is None else name
    gt_files = _pngs(gt_dir)
    if not gt_files:
        raise MetricError(f"{gt_dir}: no ground-truth PNG masks")
    if not pred_dir.is_dir():
        raise MetricError(f"{pred_dir}: prediction folder for sequence {name} missing")
    gt = [read_index_mask(f) for f in gt_files]
    pred: list[np.ndarray | None] = [None]
    for f in gt_files[1:]:
        p = pred_dir / f.name
        if not p.is_file():
            raise MetricError(f"{p}: prediction missing (every frame after the first needs one)")
        pred.append(read_index_mask(p))
    return evaluate_sequence(gt, pred, name=name, frame_names=[f.stem for f in gt_files],
                             sources=[str(pred_dir / f.name) for f in gt_files], bound_th=bound_th)


def list_sequences(gt_dir: str | os.PathLike) -> list[str]:
    """Sub-folders of gt_dir that hold PNG masks, sorted."""
    root = Path(gt_dir)
    if not root.is_dir():
        raise MetricError(f"{root}: ground-truth folder not found")
    return sorted(d.name for d in root.iterdir() if d.is_dir() and _pngs(d))


def evaluate_folders(gt_dir: str | os.PathLike, pred_dir: str | os.PathLike,
                     sequences: Sequence[str] | None = None, bound_th: float = BOUND_TH) -> list[SequenceScores]:
    """Per-frame scores of each sequence (default: every sequence folder under gt_dir)."""
    names = list_sequences(gt_dir) if not sequences else list(sequences)
    if not names:
        raise MetricError(f"{gt_dir}: no sequence folders with PNG masks")
    if not Path(pred_dir).is_dir():
        raise MetricError(f"{pred_dir}: prediction folder not found")
    out = []
    for name in names:
        if not (Path(gt_dir) / name).is_dir():
            raise MetricError(f"{Path(gt_dir) / name}: ground truth for sequence {name} not found")
        out.append(evaluate_folder(Path(gt_dir) / name, Path(pred_dir) / name, name, bound_th))
    return out


def score_folders(gt_dir: str | os.PathLike, pred_dir: str | os.PathLike,
                  sequences: Sequence[str] | None = None, bound_th: float = BOUND_TH) -> dict:
    """`summarize(evaluate_folders(...))`: the dataset, per-sequence and per-object scores."""
    return summarize(evaluate_folders(gt_dir, pred_dir, sequences, bound_th))


# ----------------------------------------------------------------------------- CLI

def format_table(summary: dict) -> str:
    """Per-sequence rows and the overall row, one column per key."""
    width = max([len("sequence"), len("overall"), *map(len, summary["sequences"])])
    lines = [f"{'sequence':<{width}}  " + "  ".join(f"{k:>8}" for k in KEYS)]
    rows = [*summary["sequences"].items(), ("overall", summary)]
    for i, (name, row) in enumerate(rows):
        if i == len(rows) - 1:
            lines.append("-" * len(lines[0]))
        lines.append(f"{name:<{width}}  " + "  ".join(f"{row[k]:>8.4f}" for k in KEYS))
    return "\n".join(lines)


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write JSON through a temporary file in the same folder, then rename: never a partial file."""
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", required=True, help="ground-truth folder holding <sequence>/<frame>.png")
    parser.add_argument("--pred", required=True, help="prediction folder holding <sequence>/<frame>.png")
    parser.add_argument("--sequences", nargs="+", default=None, metavar="SEQ",
                        help="sequences to score (default: every sequence folder under --gt)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the scores as JSON here")
    parser.add_argument("--bound-th", type=float, default=BOUND_TH,
                        help="boundary tolerance: fraction of the image diagonal (< 1) or pixels (>= 1)")


def run(args: argparse.Namespace) -> int:
    try:
        summary = score_folders(args.gt, args.pred, args.sequences, args.bound_th)
    except MetricError as exc:
        print(f"stm score: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(summary))
    if args.json:
        try:
            write_json_atomic(args.json, summary)
        except OSError as exc:
            print(f"stm score: error: cannot write {args.json}: {exc}", file=sys.stderr)
            return 2
    return 0
