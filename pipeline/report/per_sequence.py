"""STM policies sequence by sequence: whether a policy's place in the table holds on every video.

On a benchmark of a few sequences, a difference of a few tenths of J&F between two memory policies
can be one sequence going up and another going down. The table shows each policy's J&F per
sequence and its difference from `First` (the others add frames to it; Previous replaces it), and a note names
the policies whose difference from `First` changes sign from one sequence to another: the
benchmark does not rank those against `First`.

Reads results/<variant>/sequences.csv, which `stm evaluate` writes for every variant; the table
itself is rendered with the report's others (pipeline/report/tables.py).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SequenceScores = dict[str, dict[str, float]]  # variant -> sequence -> J&F (0..1)


class PerSequenceError(RuntimeError):
    pass


def read_sequence_scores(results_dir: Path, variants: Sequence[str]) -> SequenceScores:
    """{variant: {sequence: J&F}} from results/<variant>/sequences.csv, for the variants given."""
    scores: SequenceScores = {}
    for variant in variants:
        path = results_dir / variant / "sequences.csv"
        if not path.is_file():
            raise PerSequenceError(f"{path}: not found (the evaluation's results are incomplete); re-run `stm evaluate`")
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        if rows and not {"sequence", "JF_mean"} <= rows[0].keys():
            raise PerSequenceError(f"{path}: no `sequence` / `JF_mean` column; re-run `stm evaluate`")
        per = {}
        for r in rows:
            try:
                per[r["sequence"]] = float(r["JF_mean"])
            except (TypeError, ValueError):
                per[r["sequence"]] = math.nan
        scores[variant] = per
    return scores


@dataclass
class VersusFirst:
    """One policy against First, sequence by sequence."""

    diffs: list[float]  # per sequence: this policy's J&F minus First's (nan where either is missing)
    better: int  # sequences where it is above First (by more than 0.05 J&F x100)
    worse: int  # sequences where it is below

    @property
    def changes_sign(self) -> bool:
        return self.better > 0 and self.worse > 0


def versus_first(own: dict[str, float], first: dict[str, float], sequences: Sequence[str]) -> VersusFirst:
    diffs = [own.get(s, math.nan) - first.get(s, math.nan) for s in sequences]
    decided = [d for d in diffs if not math.isnan(d)]
    return VersusFirst(diffs, sum(d > 5e-4 for d in decided), sum(d < -5e-4 for d in decided))


def sign_change_note(label: str, v: VersusFirst) -> str:
    return (f"{label} vs First: better on {v.better} sequence(s) and worse on {v.worse}; the difference changes "
            "sign from one sequence to another, so this benchmark does not rank the two.")
