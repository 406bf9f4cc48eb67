"""The report's rows: one per evaluated variant, read from the evaluation's own outputs, in table order.

`rows_from_outputs` joins results/evaluation.json (the variants in params order, each model's training
data) with plots/evaluate_variants.csv (the scores); `stm_rows` and `strmn_rows` order them for the STM
and STRMN tables, `oracle_pairs` pairs each oracle row with its plain twin, and the labels are the
papers' row names.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

# the columns of plots/evaluate_variants.csv (pipeline.evaluate.outputs.METRICS) the report shows
METRICS = ("JF_mean", "J_mean", "J_recall", "J_decay", "F_mean", "F_recall", "F_decay", "fps", "ms_per_frame",
           "peak_memory_mb", "memory_entries", "memory_mb")



class ReportError(RuntimeError):
    pass



def read_record(path: Path, key: str, kind: type, what: str, error: type[Exception] = ReportError) -> dict:
    """A JSON record `stm evaluate` wrote, with `key` of type `kind`; else `error` naming the file."""
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err}); re-run `stm evaluate`") from err
    if not isinstance(record, dict) or not isinstance(record.get(key), kind):
        raise error(f"{path}: not {what}; re-run `stm evaluate`")
    return record



COPY_FIRST = "copy-first"

STM_ORDER = ("first", "previous", "first+previous", "every", "fifo")

RULE_LABELS = {"A": "Oldest vs remaining (A)", "B": "Latest vs remaining (B)",
               "C": "Least similarity pair (C)", "D": "Most similarity pair (D)"}



@dataclass
class Row:
    variant: str
    model: str  # stm | strmn | none
    policy: str
    family: str
    rule: str
    metrics: dict[str, float | None]
    training_data: str = ""  # what the variant's model was trained on (from its checkpoint)
    oracle: bool = False  # memory held the ground truth instead of predictions (a diagnostic row)

    @property
    def size(self) -> int | None:
        parts = self.policy.split(":")
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None



def _value(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x



def rows_from_outputs(evaluation: dict, variants_csv: str, where: str = "") -> list[Row]:
    """One Row per variant: its kind and policy from results/evaluation.json (`variants`, in params
    order, and `training_data` per model kind), its scores from plots/evaluate_variants.csv."""
    table = {r.get("variant", ""): r for r in csv.DictReader(io.StringIO(variants_csv))}
    missing_columns = [k for k in METRICS if table and k not in next(iter(table.values()))]
    if missing_columns:
        raise ReportError(f"{where or 'variants table'}: no column(s) {missing_columns}; re-run `stm evaluate`")
    training = evaluation.get("training_data") or {}
    rows = []
    for v in evaluation.get("variants") or []:
        name, policy = v["name"], v["policy"]
        if name not in table:
            raise ReportError(f"{where or 'variants table'}: no row for variant {name!r}; re-run `stm evaluate`")
        parts = policy.split(":")
        rule = parts[2] if parts[0] == "recurrent" and len(parts) == 3 else ""
        rows.append(Row(name, v["model"], policy, parts[0], rule, {k: _value(table[name][k]) for k in METRICS},
                        str(training.get(v["model"], "")), bool(v.get("oracle", False))))
    if not rows:
        raise ReportError("results/evaluation.json names no variant; re-run `stm evaluate`")
    return rows



def stm_rows(rows: list[Row]) -> list[Row]:
    def order(r: Row):
        rank = STM_ORDER.index(r.family) if r.family in STM_ORDER else len(STM_ORDER)
        return (rank, r.size or 0, r.policy)
    return [r for r in rows if r.variant == COPY_FIRST] + sorted((r for r in rows if r.model == "stm" and not r.oracle),
                                                                  key=order)



def strmn_rows(rows: list[Row]) -> list[Row]:
    model = sorted((r for r in rows if r.model == "strmn" and not r.oracle),
                   key=lambda r: (r.rule or "~", r.size or 0, r.policy))
    return [r for r in rows if r.variant == COPY_FIRST] + model



def oracle_pairs(rows: list[Row]) -> list[tuple[Row | None, Row]]:
    """(the plain variant or None, its oracle twin) for each oracle row, in the tables' order."""
    plain = {(r.model, r.policy): r for r in rows if not r.oracle}
    order = {r.variant: i for i, r in enumerate(stm_rows(rows) + strmn_rows(rows))}
    pairs = [(plain.get((r.model, r.policy)), r) for r in rows if r.oracle]
    return sorted(pairs, key=lambda p: (p[1].model != "stm", order.get(p[0].variant, 1e9) if p[0] else 1e9))



def label(r: Row) -> str:
    return strmn_label(r) if r.model == "strmn" else stm_label(r)



def stm_label(r: Row) -> str:
    if r.variant == COPY_FIRST:
        return "Copy first mask (no model)"
    labels = {"first": "First", "previous": "Previous", "first+previous": "First & Previous"}
    if r.family in labels:
        return labels[r.family]
    if r.family == "every":
        return f"Every {r.size} frames"
    if r.family == "fifo" and r.size is not None:
        return f"First + latest {r.size - 1} (FIFO {r.size})"
    return r.policy



def strmn_label(r: Row) -> str:
    if r.variant == COPY_FIRST:
        return "Copy first mask (no model)"
    if r.rule in RULE_LABELS:
        return RULE_LABELS[r.rule]
    if r.family == "recurrent-i2m":
        return f"Input to memory (I2M, K={r.size})"
    return r.policy

