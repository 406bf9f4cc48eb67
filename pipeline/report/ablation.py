"""The ablation tables and chart of `stm report`, built from the evaluation's own outputs.

Scores are shown x100 with one decimal, as in the papers; time is seconds per frame (STM Table 5).
Nothing here reads a clock, MLflow or git: the same inputs give the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.report.distinct import distinct_notes
from pipeline.report.per_sequence import SequenceScores, sign_change_note, versus_first
from stm_core.data.io import atomic_write_bytes

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
# Published numbers on DAVIS-2017 val (ResNet-50), each with the training data behind it:
# - STM Table 5 (J Mean, s/frame on DAVIS-2016): the model trained with YouTube-VOS (+YV);
# - STM Table 3 "Ours" (J Mean): the model trained on DAVIS only (Every 5 frames, the final model);
# - STRMN Table 4 (J, F, mean): pre-trained on static images, fine-tuned on DAVIS-2017 only.
PAPER_STM = {"first": (67.0, 0.06), "previous": (69.6, 0.06), "first+previous": (77.7, 0.07), "every:5": (79.2, 0.16)}
PAPER_STM_DAVIS_ONLY = {"every:5": 69.2}
PAPER_STRMN = {"A": (74.5, 80.1, 77.3), "B": (73.0, 78.5, 75.7), "C": (76.1, 81.0, 78.5), "D": (74.9, 80.1, 77.5)}
PAPER_STRMN_I2M = (69.2, 74.7, 72.0)  # STRMN Table 3, same training data as Table 4
STM_WITH_YOUTUBE = "Paper: J / time (DAVIS-17; STM Table 5, trained with YouTube-VOS)"
STM_DAVIS_ONLY = "Paper: J (DAVIS-17; STM Table 3, trained on DAVIS only)"
STRMN_PAPER = "Paper: J / F / Mean (DAVIS-17; STRMN Table 4, static images + DAVIS only)"


def trained_with_youtube(training_data: str) -> bool:
    return "youtube" in training_data.lower()


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
            *_table(["Memory", "J&F, predictions memorised", "J&F, ground truth memorised", "Gain"], body), ""]


def stm_label(r: Row) -> str:
    if r.variant == COPY_FIRST:
        return "Copy first mask (no model)"
    labels = {"first": "First", "previous": "Previous", "first+previous": "First & Previous"}
    if r.family in labels:
        return labels[r.family]
    if r.family == "every":
        return f"Every {r.size} frames"
    if r.family == "fifo":
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


def pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def num(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def seconds(r: Row) -> str:
    ms = r.metrics.get("ms_per_frame")
    return "–" if ms is None else f"{ms / 1000:.3f}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def stm_paper_column(rows: list[Row]) -> str:
    """The published column that fits the STM model evaluated: Table 5 needs YouTube-VOS training."""
    data = [r.training_data for r in rows if r.model == "stm"]
    return STM_WITH_YOUTUBE if data and all(trained_with_youtube(d) for d in data) else STM_DAVIS_ONLY


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
    return _table(["Memory frame(s)", "J&F", "J", "F", "Time (s/frame)", "Memory entries", "Memory (MB)",
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
    return _table(["Memory variants", "J", "F", "Mean", "Slots (K)", "Memory entries", "Memory (MB)",
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
            *_table(["Methods", "J", "F", "Avg", "Paper: J / F / Avg (DAVIS-17, STRMN Table 3)"], body), ""]


def signed(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:+.1f}"


def per_sequence_table(labelled: list[tuple[str, str]], scores: SequenceScores, first: str,
                       sequences: list[str]) -> tuple[list[str], list[str]]:
    """-> (markdown table lines, notes). `labelled`: (variant, label) of the STM rows in table order;
    `first`: the variant of the First policy, the reference of the difference columns."""
    reference = scores.get(first, {})
    body, notes = [], []
    for variant, label in labelled:
        own = scores.get(variant, {})
        cells = [label, *(pct(own.get(s, math.nan)) for s in sequences)]
        if variant == first or not reference:
            body.append([*cells, "", ""])
            continue
        v = versus_first(own, reference, sequences)
        body.append([*cells, " / ".join(signed(d) for d in v.diffs), f"{v.better} / {v.worse}"])
        if v.changes_sign:
            notes.append(sign_change_note(label, v))
    header = ["Memory frame(s)", *(f"`{s}`" for s in sequences), "Difference from First, per sequence",
              "Sequences better / worse than First"]
    return _table(header, body), notes


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


def training_note(rows: list[Row]) -> str:
    """One sentence per model kind: what it was trained on, and which published figure fits it."""
    notes = []
    for kind, name in (("stm", "STM"), ("strmn", "STRMN")):
        data = sorted({r.training_data for r in rows if r.model == kind and r.training_data})
        if data:
            notes.append(f"The {name} model evaluated here was trained on: {'; '.join(data)}.")
    if any(r.model == "stm" for r in rows):
        if stm_paper_column(rows) == STM_WITH_YOUTUBE:
            notes.append("Its paper column is STM Table 5, whose numbers come from the model trained with "
                         "YouTube-VOS (+YV): the same training data, so the columns compare directly.")
        else:
            notes.append("STM Table 5's numbers come from the model trained with YouTube-VOS (+YV), which this "
                         "model was not, so the paper column shows the published DAVIS-only figure instead "
                         "(STM Table 3, every 5 frames: J 69.2, F 74.0); Table 5 (+YV): 67.0 / 69.6 / 77.7 / 79.2 J.")
    return " ".join(notes)


def all_table(rows: list[Row]) -> list[str]:
    body = []
    for r in rows:
        m = r.metrics
        body.append([f"`{r.variant}`", *(pct(m[k]) for k in ("JF_mean", "J_mean", "J_recall", "J_decay",
                                                              "F_mean", "F_recall", "F_decay")),
                     num(m["fps"], 1), num(m["peak_memory_mb"], 1), num(m["memory_entries"], 0), num(m["memory_mb"], 2)])
    return _table(["Variant", "J&F", "J Mean", "J Recall", "J Decay", "F Mean", "F Recall", "F Decay", "FPS",
                   "Peak memory (MB)", "Memory entries", "Memory (MB)"], body)


def _write_atomic(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def render_markdown(out: Path, evaluation: dict, rows: list[Row], chart: Path,
                    sequence_scores: SequenceScores | None = None, probe: list[str] = ()) -> None:
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


def render_chart(path: Path, rows: list[Row], title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stm, strmn = stm_rows(rows), strmn_rows(rows)
    panels = [x for x in (("stm", stm), ("strmn", strmn)) if any(r.model == x[0] for r in x[1])] or [("stm", stm)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (kind, table) in zip(axes[0], panels):
        labels = [stm_label(r) if kind == "stm" else strmn_label(r) for r in table]
        ys = range(len(table))
        if kind == "stm":
            values = [100 * (r.metrics["JF_mean"] or 0) for r in table]
            bars = ax.barh(list(ys), values, color=["#999999" if r.variant == COPY_FIRST else "#1f77b4" for r in table])
            for bar, r in zip(bars, table):
                ax.text(bar.get_width() + 0.5, bar.get_y() + bar.get_height() / 2, f"{seconds(r)} s/frame",
                        va="center", fontsize=8)
            twins = {plain.variant: oracle for plain, oracle in oracle_pairs(rows) if plain is not None}
            marked = [(y, twins[r.variant]) for y, r in zip(ys, table) if r.variant in twins]
            if marked:  # the oracle twin as an outline: how far perfect memory would take each policy
                ax.barh([y for y, _ in marked], [100 * (o.metrics["JF_mean"] or 0) for _, o in marked],
                        fill=False, edgecolor="#d62728", linestyle="--", label="ground truth in memory (oracle)")
                ax.legend(loc="lower right", fontsize=8)
            ax.set_title("STM memory frames (Table 5): J&F")
        else:
            height = 0.27
            for k, (key, name) in enumerate((("J_mean", "J"), ("F_mean", "F"), ("JF_mean", "Mean"))):
                ax.barh([y + (k - 1) * height for y in ys], [100 * (r.metrics[key] or 0) for r in table],
                        height=height, label=name)
            ax.legend(loc="lower right", fontsize=8)
            sizes = sorted({r.size for r in table if r.model == "strmn" and r.size})
            ax.set_title("STRMN update rules (Table 4)" + (f", K = {', '.join(map(str, sizes))}" if sizes else ""))
        ax.set_yticks(list(ys), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 115)
        ax.set_xlabel("score x100")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
