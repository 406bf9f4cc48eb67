"""What `stm evaluate` writes: per-variant summaries, metrics/evaluate.json, plot data, tables, overlays.

Metric names are MLflow-safe (no '&'): JF_mean, J_mean, J_recall, J_decay, F_mean, F_recall,
F_decay (DAVIS scores in [0, 1], the official aggregation: mean over all objects), fps,
ms_per_frame, peak_memory_mb, memory_entries, memory_mb: the metrics of each MLflow child run.
metrics/evaluate.json holds `{variant: {metric: value}}` for DVC_METRICS (all but ms_per_frame
and memory_mb, which the report reads from MLflow).
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.evaluate.worker import SequenceResult
from stm_core.data.io import (
    DAVIS_PALETTE,
    atomic_write_bytes,
    decode_image,
    decode_index_mask_png,
    encode_image,
    write_json_atomic,
)
from stm_core.scoring.sequences import KEYS, summarize

# stm_core.scoring.sequences key -> MLflow / JSON metric name
SCORE_NAMES = {"J&F-Mean": "JF_mean", "J-Mean": "J_mean", "J-Recall": "J_recall", "J-Decay": "J_decay",
               "F-Mean": "F_mean", "F-Recall": "F_recall", "F-Decay": "F_decay"}
METRICS = (*SCORE_NAMES.values(), "fps", "ms_per_frame", "peak_memory_mb", "memory_entries", "memory_mb")
# metrics/evaluate.json keeps the scores, speed and memory size (dvc exp show gets one column per variant x metric)
DVC_METRICS = (*SCORE_NAMES.values(), "fps", "peak_memory_mb", "memory_entries")
MB = 2 ** 20
SUMMARY_FILE = "summary.json"  # beside metrics/evaluate.json: the headline `dvc exp show` leads with


@dataclass
class VariantSummary:
    name: str
    metrics: dict[str, float]  # METRICS
    summary: dict  # stm_core.scoring.sequences.summarize output (dataset, per-sequence, per-object scores)
    results: list[SequenceResult]  # in sequence order


def _clean(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else round(value, 6)


def summarize_variant(name: str, results: Sequence[SequenceResult]) -> VariantSummary:
    summary = summarize([r.scores for r in results])
    frames = sum(r.frames for r in results)
    seconds = sum(r.seconds for r in results)
    metrics = {SCORE_NAMES[k]: float(summary[k]) for k in KEYS}
    metrics["fps"] = frames / seconds if seconds > 0 else float("inf")
    metrics["ms_per_frame"] = 1000 * seconds / frames if frames else float("nan")
    metrics["peak_memory_mb"] = max(r.peak_memory_bytes for r in results) / MB
    metrics["memory_entries"] = float(max(r.memory_entries for r in results))
    metrics["memory_mb"] = max(r.memory_bytes for r in results) / MB
    return VariantSummary(name, metrics, summary, list(results))


def metrics_json(summaries: Sequence[VariantSummary], keys: Sequence[str] = METRICS) -> dict[str, dict[str, float | None]]:
    """{variant: {metric: value}}: two levels, so `dvc metrics show` lists `stm-every-5.JF_mean`."""
    return {s.name: {k: _clean(s.metrics[k]) for k in keys} for s in summaries}


def short_label(name: str) -> str:
    """A column name that stays put when only memory sizes change, and short enough that J&F of
    every default variant fits one 200-column `dvc exp show`: the variant name without its numbers,
    the `stm-` of STM policies and the `recurrent` of STRMN ones (stm-every-5 -> every,
    strmn-recurrent-3-C -> strmn-C). So `-S memory.slots=5` lands in the baseline's column."""
    parts = [p for p in name.split("-") if not p.isdigit() and p != "recurrent"]
    if len(parts) > 1 and parts[0] == "stm":
        parts = parts[1:]
    return "-".join(parts) or name


def summary_json(summaries: Sequence[VariantSummary]) -> dict[str, dict[str, float | None]]:
    """metrics/summary.json: {"JF": {label: J&F x100}, "FPS": {label: fps}}, one decimal, labels from
    `short_label` (the full name where two variants would share one, or a label would be a name)."""
    labels = [short_label(s.name) for s in summaries]
    labels = [label if labels.count(label) == 1 else s.name for label, s in zip(labels, summaries)]

    def rounded(value: float, scale: float) -> float | None:
        clean = _clean(value)
        return None if clean is None else round(scale * clean, 1)

    return {"JF": {label: rounded(s.metrics["JF_mean"], 100) for label, s in zip(labels, summaries)},
            "FPS": {label: rounded(s.metrics["fps"], 1) for label, s in zip(labels, summaries)}}


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence[object]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    return buf.getvalue().encode()


def variants_table(summaries: Sequence[VariantSummary]) -> bytes:
    """plots/evaluate_variants.csv: one row per variant (J&F per variant; dvc plots: x=JF_mean, y=variant)."""
    rows = [[s.name, *(_clean(s.metrics[k]) for k in METRICS)] for s in summaries]
    return _csv_bytes(["variant", *METRICS], rows)


def j_per_frame_table(summaries: Sequence[VariantSummary]) -> bytes:
    """plots/evaluate_j_per_frame.csv: `frame` then one column per variant: J at that frame index,
    averaged over every object of every sequence scored there (how accuracy holds up over time)."""
    columns: dict[str, dict[int, list[float]]] = {}
    for s in summaries:
        per: dict[int, list[float]] = {}
        for r in s.results:
            index = {name: i for i, name in enumerate(r.frame_names)}
            for j, frame in enumerate(r.scores.frames):
                per.setdefault(index[frame], []).extend(r.scores.J[:, j].tolist())
        columns[s.name] = per
    frames = sorted({t for per in columns.values() for t in per})
    rows = []
    for t in frames:
        row: list[object] = [t]
        for per in columns.values():
            vals = [v for v in per.get(t, []) if not math.isnan(v)]
            row.append(round(float(np.mean(vals)), 6) if vals else None)
        rows.append(row)
    return _csv_bytes(["frame", *columns], rows)


def sequence_table(summary: VariantSummary) -> bytes:
    """Per-sequence scores and speed of one variant (MLflow artifact, results/<variant>/sequences.csv)."""
    header = ["sequence", "objects", "frames", *SCORE_NAMES.values(), "fps", "peak_memory_mb", "memory_entries"]
    rows = []
    for r in summary.results:
        seq = summary.summary["sequences"][r.name]
        fps = r.frames / r.seconds if r.seconds > 0 else None
        rows.append([r.name, len(r.scores.object_ids), r.frames, *(_clean(seq[k]) for k in KEYS),
                     None if fps is None else _clean(fps), _clean(r.peak_memory_bytes / MB), r.memory_entries])
    return _csv_bytes(header, rows)


def write_dvc_outputs(summaries: Sequence[VariantSummary], metrics_path: Path, plots_dir: Path) -> list[Path]:
    """metrics/summary.json, metrics/evaluate.json and the two plot files, each written atomically."""
    variants_csv = plots_dir / "evaluate_variants.csv"
    frames_csv = plots_dir / "evaluate_j_per_frame.csv"
    summary_path = metrics_path.with_name(SUMMARY_FILE)
    atomic_write_bytes(variants_csv, variants_table(summaries))
    atomic_write_bytes(frames_csv, j_per_frame_table(summaries))
    write_json_atomic(summary_path, summary_json(summaries))
    write_json_atomic(metrics_path, metrics_json(summaries, DVC_METRICS))  # last: its presence means the rest is there
    return [summary_path, metrics_path, variants_csv, frames_csv]


# ----------------------------------------------------------------------------- result folders

class ResultsWriter:
    """results/<variant>/<sequence>/%05d.png. A variant's folder appears complete or not at all:
    it is filled under results/.partial/ and moved into place once all its sequences are written."""

    def __init__(self, root: Path):
        self.root = root
        self.partial = root / ".partial"
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)

    def add(self, result: SequenceResult) -> None:
        folder = self.partial / result.variant / result.name
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in zip(result.frame_names, result.masks):
            (folder / f"{name}.png").write_bytes(data)

    def commit(self, summary: VariantSummary) -> Path:
        src = self.partial / summary.name
        (src / "sequences.csv").write_bytes(sequence_table(summary))
        dst = self.root / summary.name
        if dst.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{summary.name}.old.", dir=self.root))
            os.replace(dst, trash / "old")
            shutil.rmtree(trash)
        os.replace(src, dst)
        return dst

    def close(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


# ----------------------------------------------------------------------------- overlays

def overlay(frame: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Frame H x W x 3 uint8 with each object tinted in its DAVIS colour and outlined."""
    palette = np.asarray(DAVIS_PALETTE, dtype=np.float32).reshape(-1, 3)
    out = frame.astype(np.float32)
    fg = mask > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * palette[mask[fg]]
    edge = np.zeros_like(fg)
    edge[:-1] |= mask[:-1] != mask[1:]
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    out[edge & fg] = palette[mask[edge & fg]]
    return np.clip(out, 0, 255).astype(np.uint8)


def overlay_images(result: SequenceResult, frames: Sequence[bytes], count: int) -> dict[str, bytes]:
    """`count` evenly spaced frames of one sequence as overlay PNGs: {file name: bytes}."""
    if count <= 0:
        return {}
    n = len(frames)
    picks = sorted({int(round(i)) for i in np.linspace(1 if n > 1 else 0, n - 1, num=min(count, n))})
    out = {}
    for t in picks:
        image = decode_image(frames[t])
        mask = decode_index_mask_png(result.masks[t])
        out[f"{result.name}_{result.frame_names[t]}.png"] = encode_image(overlay(image, mask), "png")
    return out
