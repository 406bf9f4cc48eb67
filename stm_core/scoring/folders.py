"""Scoring folders of PNG masks: `<gt>/<sequence>/<frame>.png` against `<pred>/<sequence>/<frame>.png`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stm_core.scoring.masks import MetricError, read_index_mask
from stm_core.scoring.measures import BOUND_TH
from stm_core.scoring.sequences import SequenceScores, evaluate_sequence, summarize


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
