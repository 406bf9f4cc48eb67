"""The report's markdown tables: STM Table 5 and STRMN Tables 3-4 layouts, the policies sequence by
sequence, the oracle diagnostic and every variant's full scores.

Scores are shown x100 with one decimal, as in the papers; time is seconds per frame (STM Table 5).
"""

from __future__ import annotations

import math

from pipeline.report.paper import (
    PAPER_STM,
    PAPER_STM_DAVIS_ONLY,
    PAPER_STRMN,
    PAPER_STRMN_I2M,
    STM_WITH_YOUTUBE,
    STRMN_PAPER,
    stm_paper_column,
)
from pipeline.report.per_sequence import SequenceScores, sign_change_note, versus_first
from pipeline.report.rows import Row, label, oracle_pairs, stm_label, stm_rows, strmn_label, strmn_rows


def pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"



def num(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"



def seconds(r: Row) -> str:
    ms = r.metrics.get("ms_per_frame")
    return "–" if ms is None else f"{ms / 1000:.3f}"



def signed(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:+.1f}"



def markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]



def oracle_table(rows: list[Row]) -> list[str]:
    """Each oracle variant beside its plain twin: what the model's own mistakes in memory cost."""
    pairs = oracle_pairs(rows)
    if not pairs:
        return []
    body = []
    for plain, oracle in pairs:
        p, o = (plain.metrics["JF_mean"] if plain else None), oracle.metrics["JF_mean"]
        gain = signed(o - p) if p is not None and o is not None else ""
        body.append([f"{oracle.model.upper()}: {label(oracle)}", pct(p), pct(o), gain])
    return ["## Memory holding the ground truth (oracle diagnostic)", "",
            "The same model and policy, but every frame the policy memorises holds its ground-truth mask instead "
            "of the prediction (the returned masks are still predictions). The gain is what the model's own "
            "mistakes in memory cost; what stays below 100 with perfect memory is the model's reading itself.", "",
            *markdown_table(["Memory", "J&F, predictions memorised", "J&F, ground truth memorised", "Gain"], body), ""]



def stm_table(rows: list[Row]) -> list[str]:
    column = stm_paper_column(rows)
    body = []
    for r in stm_rows(rows):
        m = r.metrics
        paper = ""
        if r.model == "stm" and column == STM_WITH_YOUTUBE and r.policy in PAPER_STM:
            paper = "{:.1f} / {:.2f}".format(*PAPER_STM[r.policy])
        elif r.model == "stm" and r.policy in PAPER_STM_DAVIS_ONLY:
            paper = f"{PAPER_STM_DAVIS_ONLY[r.policy]:.1f}"
        body.append([stm_label(r), pct(m["JF_mean"]), pct(m["J_mean"]), pct(m["F_mean"]), seconds(r),
                     num(m["memory_entries"], 0), num(m["memory_mb"], 2), paper])
    return markdown_table(["Memory frame(s)", "J&F", "J", "F", "Time (s/frame)", "Memory entries", "Memory (MB)",
                   column], body)



def strmn_table(rows: list[Row]) -> list[str]:
    body = []
    for r in strmn_rows(rows):
        m = r.metrics
        paper = PAPER_STRMN.get(r.rule) if r.model == "strmn" else None
        if r.model == "strmn" and r.family == "recurrent-i2m":
            paper = PAPER_STRMN_I2M
        body.append([strmn_label(r), pct(m["J_mean"]), pct(m["F_mean"]), pct(m["JF_mean"]),
                     str(r.size) if r.model == "strmn" and r.size else "–", num(m["memory_entries"], 0),
                     num(m["memory_mb"], 2), seconds(r), " / ".join(f"{v:.1f}" for v in paper) if paper else ""])
    return markdown_table(["Memory variants", "J", "F", "Mean", "Slots (K)", "Memory entries", "Memory (MB)",
                   "Time (s/frame)", STRMN_PAPER], body)



def i2m_table(rows: list[Row]) -> list[str]:
    """STRMN Table 3: input-to-memory vs memory-to-memory (rule C), when both were evaluated."""
    i2m = [r for r in rows if r.model == "strmn" and r.family == "recurrent-i2m"]
    m2m = [r for r in rows if r.model == "strmn" and r.rule == "C"]
    if not i2m or not m2m:
        return []
    body = [[label, pct(r.metrics["J_mean"]), pct(r.metrics["F_mean"]), pct(r.metrics["JF_mean"]),
             " / ".join(f"{v:.1f}" for v in paper)]
            for label, r, paper in (("Input to memory (I2M)", i2m[0], PAPER_STRMN_I2M),
                                    ("Memory to memory (M2M, rule C)", m2m[0], PAPER_STRMN["C"]))]
    return ["## STRMN input vs memory update (STRMN Table 3 layout)", "",
            *markdown_table(["Methods", "J", "F", "Avg", "Paper: J / F / Avg (DAVIS-17, STRMN Table 3)"], body), ""]



def per_sequence_table(labelled: list[tuple[str, str]], scores: SequenceScores, first: str,
                       sequences: list[str]) -> tuple[list[str], list[str]]:
    """-> (markdown table lines, notes). `labelled`: (variant, label) of the STM rows in table order;
    `first`: the variant of the First policy, the reference of the difference columns."""
    reference = scores.get(first, {})
    body, notes = [], []
    for variant, row_label in labelled:
        own = scores.get(variant, {})
        cells = [row_label, *(pct(own.get(s, math.nan)) for s in sequences)]
        if variant == first or not reference:
            body.append([*cells, "", ""])
            continue
        v = versus_first(own, reference, sequences)
        body.append([*cells, " / ".join(signed(d) for d in v.diffs), f"{v.better} / {v.worse}"])
        if v.changes_sign:
            notes.append(sign_change_note(row_label, v))
    header = ["Memory frame(s)", *(f"`{s}`" for s in sequences), "Difference from First, per sequence",
              "Sequences better / worse than First"]
    return markdown_table(header, body), notes



def stm_per_sequence(rows: list[Row], scores: SequenceScores | None, sequences: list[str]) -> list[str]:
    """The STM policies' J&F per sequence and their difference from First (when First was evaluated)."""
    stm = [r for r in stm_rows(rows) if r.model == "stm"]
    first = [r.variant for r in stm if r.family == "first"]
    if not scores or not first or len(stm) < 2 or not sequences:
        return []
    table, notes = per_sequence_table([(r.variant, stm_label(r)) for r in stm], scores, first[0], sequences)
    return ["### STM memory policies sequence by sequence (J&F)", "",
            "First is the reference: the difference from it on each video says whether a policy's other "
            "memory frames (for Previous: the latest frame instead of the first) helped there.", "",
            *table, "", *[f"Note: {n}\n" for n in notes]]



def all_table(rows: list[Row]) -> list[str]:
    body = []
    for r in rows:
        m = r.metrics
        body.append([f"`{r.variant}`", *(pct(m[k]) for k in ("JF_mean", "J_mean", "J_recall", "J_decay",
                                                              "F_mean", "F_recall", "F_decay")),
                     num(m["fps"], 1), num(m["peak_memory_mb"], 1), num(m["memory_entries"], 0), num(m["memory_mb"], 2)])
    return markdown_table(["Variant", "J&F", "J Mean", "J Recall", "J Decay", "F Mean", "F Recall", "F Decay", "FPS",
                   "Peak memory (MB)", "Memory entries", "Memory (MB)"], body)

