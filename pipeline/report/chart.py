"""reports/ablation.png: the STM policies' J&F (with the oracle as an outline) and STRMN's J, F and mean
per update rule, as horizontal bars."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pipeline.report.rows import COPY_FIRST, Row, oracle_pairs, stm_label, stm_rows, strmn_label, strmn_rows
from pipeline.report.tables import seconds


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

