"""STM policies sequence by sequence: whether a policy's place in the table holds on every video.

On a benchmark of a few sequences, a difference of a few tenths of J&F between two memory policies
can be one sequence going up and another going down. The table shows each policy's J&F per
sequence and its difference from `First` (the others add frames to it; Previous replaces it), and a note names
the policies whose difference from `First` changes sign from one sequence to another: the
benchmark does not rank those against `First`.

Reads results/<variant>/sequences.csv, which `stm evaluate` writes for every variant.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
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


def _signed(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:+.1f}"


def _pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def per_sequence_table(labelled: Sequence[tuple[str, str]], scores: SequenceScores, first: str,
                       sequences: Sequence[str]) -> tuple[list[str], list[str]]:
    """-> (markdown table lines, notes). `labelled`: (variant, label) of the STM rows in table order;
    `first`: the variant of the First policy, the reference of the difference columns."""
    header = ["Memory frame(s)", *(f"`{s}`" for s in sequences), "Difference from First, per sequence",
              "Sequences better / worse than First"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    reference = scores.get(first, {})
    notes = []
    for variant, label in labelled:
        own = scores.get(variant, {})
        values = [own.get(s, math.nan) for s in sequences]
        if variant == first or not reference:
            diff_cell, count_cell = "", ""
        else:
            diffs = [v - reference.get(s, math.nan) for v, s in zip(values, sequences)]
            better = sum(d > 5e-4 for d in diffs if not math.isnan(d))
            worse = sum(d < -5e-4 for d in diffs if not math.isnan(d))
            diff_cell, count_cell = " / ".join(_signed(d) for d in diffs), f"{better} / {worse}"
            if better and worse:
                notes.append(f"{label} vs First: better on {better} sequence(s) and worse on {worse}; the "
                             "difference changes sign from one sequence to another, so this benchmark does not "
                             "rank the two.")
        lines.append("| " + " | ".join([label, *(_pct(v) for v in values), diff_cell, count_cell]) + " |")
    return lines, notes
