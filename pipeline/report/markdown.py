"""reports/ablation.md: the tables and notes in one document. Nothing here reads a clock, MLflow or
git: the same inputs give the same bytes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.report.distinct import distinct_notes
from pipeline.report.paper import training_note
from pipeline.report.per_sequence import SequenceScores
from pipeline.report.rows import Row
from pipeline.report.tables import (
    all_table,
    i2m_table,
    oracle_table,
    stm_per_sequence,
    stm_table,
    strmn_table,
)
from stm_core.data.io import atomic_write_bytes


def _write_atomic(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())



def render_markdown(out: Path, evaluation: dict, rows: list[Row], chart: Path,
                    sequence_scores: SequenceScores | None = None, probe: Sequence[str] = ()) -> None:
    sequences = [str(s) for s in evaluation.get("sequences") or []]
    n_seq = len(sequences)
    lines = [
        "# Memory ablation",
        "",
        f"Benchmark `{evaluation.get('dataset', '')}` split `{evaluation.get('split', '')}`, {n_seq} sequences; "
        f"MLflow parent run `{evaluation.get('parent_run_id', '')}` (experiment `{evaluation.get('experiment', '')}`).",
        "",
        "Scores are the DAVIS-2017 semi-supervised measures (x100; first and last frames not scored; "
        "mean over all objects). Time is seconds per frame of segmentation alone, measured while the "
        "(variant, sequence) tasks run in parallel on Ray, so compare times within one report. The paper "
        "columns are published DAVIS-2017 val numbers (ResNet-50), each labelled with the training data behind "
        "it. "
        "`Copy first mask` repeats each object's annotation on every later frame: what the model adds is "
        "the distance to that row.",
        "",
        *([training_note(rows), ""] if training_note(rows) else []),
        "## STM memory management (STM Table 5 layout)",
        "",
        *(stm_table(rows) if any(r.model == "stm" for r in rows) else ["No STM variant in this evaluation."]),
        "",
        *stm_per_sequence(rows, sequence_scores, sequences),
        "## STRMN memory update rules (STRMN Table 4 layout)",
        "",
        *(strmn_table(rows) if any(r.model == "strmn" for r in rows) else ["No STRMN variant in this evaluation."]),
        "",
        *i2m_table(rows),
        *[f"Note: {n}\n" for n in distinct_notes(rows)],
        *oracle_table(rows),
        *probe,
        "## Every variant",
        "",
        *all_table(rows),
        "",
        "Other evaluations side by side: `dvc exp show` (see the README); each run's tables also sit in MLflow.",
        "",
        f"![ablation chart]({os.path.relpath(chart, out.parent)})",
        "",
    ]
    _write_atomic(out, "\n".join(lines))

