"""The ablation tables and chart of `stm report`, built from MLflow's search_runs DataFrames.

Scores are shown x100 with one decimal, as in the papers; time is seconds per frame (STM Table 5).
"""

from __future__ import annotations

import ast
import math
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipeline.evaluate.outputs import METRICS
from stm_core.data.io import atomic_write_bytes


class ReportError(RuntimeError):
    pass


COPY_FIRST = "copy-first"
STM_ORDER = ("first", "previous", "first+previous", "every", "fifo")
RULE_LABELS = {"A": "Oldest vs remaining (A)", "B": "Latest vs remaining (B)",
               "C": "Least similarity pair (C)", "D": "Most similarity pair (D)"}
# Published numbers on DAVIS-2017 val (ResNet-50, full training): STM Table 5 (J Mean, s/frame on
# DAVIS-2016) and STRMN Table 4 (J, F, mean), for orientation only: other data, model and scale here.
PAPER_STM = {"first": (67.0, 0.06), "previous": (69.6, 0.06), "first+previous": (77.7, 0.07), "every:5": (79.2, 0.16)}
PAPER_STRMN = {"A": (74.5, 80.1, 77.3), "B": (73.0, 78.5, 75.7), "C": (76.1, 81.0, 78.5), "D": (74.9, 80.1, 77.5)}


@dataclass
class Row:
    variant: str
    model: str  # stm | strmn | none
    policy: str
    family: str
    rule: str
    metrics: dict[str, float | None]

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


def variant_order(parent) -> list[str]:
    """The evaluation's variant names in params order (logged as the parent's `variant_names`)."""
    try:
        names = ast.literal_eval(str(parent.get("params.variant_names", "[]")))
    except (ValueError, SyntaxError):
        return []
    return [str(n) for n in names] if isinstance(names, list) else []


def rows_from_runs(children, order: list[str] | None = None) -> list[Row]:
    """One Row per child run (variant) of the DataFrame from mlflow.search_runs, in `order`."""
    rows = []
    for _, run in children.iterrows():
        def get(key: str, run=run) -> str:  # absent params/tags come back as NaN
            value = run.get(key)
            return value if isinstance(value, str) else ""
        name = get("tags.stm_variant") or get("params.variant")
        if not name:
            continue
        rows.append(Row(name, get("params.model"), get("params.policy"), get("params.family"), get("params.rule"),
                        {k: _value(run.get(f"metrics.{k}")) for k in METRICS}))
    if not rows:
        raise ReportError("the evaluation's child runs carry no variant tags (stm_variant)")
    rank = {name: i for i, name in enumerate(order or [])}
    return sorted(rows, key=lambda r: (rank.get(r.variant, len(rank)), r.variant))


def stm_rows(rows: list[Row]) -> list[Row]:
    def order(r: Row):
        rank = STM_ORDER.index(r.family) if r.family in STM_ORDER else len(STM_ORDER)
        return (rank, r.size or 0, r.policy)
    return [r for r in rows if r.variant == COPY_FIRST] + sorted((r for r in rows if r.model == "stm"), key=order)


def strmn_rows(rows: list[Row]) -> list[Row]:
    model = sorted((r for r in rows if r.model == "strmn"), key=lambda r: (r.rule or "~", r.size or 0, r.policy))
    return [r for r in rows if r.variant == COPY_FIRST] + model


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
    return "–" if x is None else f"{100 * x:.1f}"


def num(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def seconds(r: Row) -> str:
    ms = r.metrics.get("ms_per_frame")
    return "–" if ms is None else f"{ms / 1000:.3f}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def stm_table(rows: list[Row]) -> list[str]:
    body = []
    for r in stm_rows(rows):
        m = r.metrics
        paper = PAPER_STM.get(r.policy) if r.model == "stm" else None
        body.append([stm_label(r), pct(m["JF_mean"]), pct(m["J_mean"]), pct(m["F_mean"]), seconds(r),
                     num(m["memory_entries"], 0), num(m["memory_mb"], 2),
                     f"{paper[0]:.1f} / {paper[1]:.2f}" if paper else ""])
    return _table(["Memory frame(s)", "J&F", "J", "F", "Time (s/frame)", "Memory entries", "Memory (MB)",
                   "Paper: J / time (DAVIS-17)"], body)


def strmn_table(rows: list[Row]) -> list[str]:
    body = []
    for r in strmn_rows(rows):
        m = r.metrics
        paper = PAPER_STRMN.get(r.rule) if r.model == "strmn" else None
        body.append([strmn_label(r), pct(m["J_mean"]), pct(m["F_mean"]), pct(m["JF_mean"]),
                     str(r.size) if r.model == "strmn" and r.size else "–", num(m["memory_entries"], 0),
                     num(m["memory_mb"], 2), seconds(r), " / ".join(f"{v:.1f}" for v in paper) if paper else ""])
    return _table(["Memory variants", "J", "F", "Mean", "Slots (K)", "Memory entries", "Memory (MB)",
                   "Time (s/frame)", "Paper: J / F / Mean (DAVIS-17)"], body)


def all_table(rows: list[Row]) -> list[str]:
    body = []
    for r in rows:
        m = r.metrics
        body.append([f"`{r.variant}`", *(pct(m[k]) for k in ("JF_mean", "J_mean", "J_recall", "J_decay",
                                                              "F_mean", "F_recall", "F_decay")),
                     num(m["fps"], 1), num(m["peak_memory_mb"], 1), num(m["memory_entries"], 0), num(m["memory_mb"], 2)])
    return _table(["Variant", "J&F", "J Mean", "J Recall", "J Decay", "F Mean", "F Recall", "F Decay", "FPS",
                   "Peak memory (MB)", "Memory entries", "Memory (MB)"], body)


def history_table(recent, current_id: str, order: list[str]) -> list[str]:
    """Recent evaluations side by side: memory settings and J&F of each variant."""
    names = {m.group(1) for c in recent.columns if (m := re.match(r"^metrics\.(.+)\.JF_mean$", c))}
    columns = [n for n in order if n in names] + sorted(names - set(order))
    settings = ["memory.every", "memory.fifo", "memory.slots", "memory.top_k"]
    body = []
    for _, run in recent.iterrows():
        start = run.get("start_time")
        when = start.strftime("%Y-%m-%d %H:%M") if hasattr(start, "strftime") else str(start)
        rid = str(run["run_id"])
        exp = run.get("tags.dvc_experiment")
        body.append([when, f"`{rid[:8]}`" + (" (this)" if rid == current_id else ""),
                     exp if isinstance(exp, str) else "",
                     *(str(run.get(f"params.{s}", "")) if isinstance(run.get(f"params.{s}"), str) else "" for s in settings),
                     *(pct(_value(run.get(f"metrics.{n}.JF_mean"))) for n in columns)])
    return _table(["Started (UTC)", "Run", "DVC exp", *settings, *(f"{n} J&F" for n in columns)], body)


def _write_atomic(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def render_markdown(out: Path, parent, rows: list[Row], recent, chart: Path, experiment: str = "") -> None:
    p = lambda key: parent.get(f"params.{key}", "")  # noqa: E731
    rid = str(parent["run_id"])
    commit = parent.get("tags.git_commit", "")
    lines = [
        "# Memory ablation",
        "",
        f"Benchmark `{p('evaluate.dataset')}` split `{p('evaluate.split')}`, {p('n_sequences')} sequences, "
        f"device `{p('evaluate.device')}`; MLflow parent run `{rid}` (experiment `{experiment or parent.get('experiment_id', '')}`), "
        f"git `{str(commit)[:10]}`, written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M')} UTC.",
        "",
        "Scores are the DAVIS-2017 semi-supervised measures (x100; first and last frames not scored; "
        "mean over all objects). Time is seconds per frame of segmentation alone, measured while the "
        "(variant, sequence) tasks run in parallel on Ray, so compare times within one report. The paper "
        "columns are the published DAVIS-2017 numbers (ResNet-50, full training) for orientation only. "
        "`Copy first mask` repeats each object's annotation on every later frame: what the model adds is "
        "the distance to that row.",
        "",
        "## STM memory management (STM Table 5 layout)",
        "",
        *(stm_table(rows) if any(r.model == "stm" for r in rows) else ["No STM variant in this evaluation."]),
        "",
        "## STRMN memory update rules (STRMN Table 4 layout)",
        "",
        *(strmn_table(rows) if any(r.model == "strmn" for r in rows) else ["No STRMN variant in this evaluation."]),
        "",
        "## Every variant",
        "",
        *all_table(rows),
        "",
        "## Recent evaluations side by side",
        "",
        *history_table(recent, rid, [r.variant for r in rows]),
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
