"""The report's read-probe section, from results/read_probe.json (written by `stm evaluate`)."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.report.rows import read_record
from pipeline.report.tables import markdown_table

MATCHING = 2.0  # on-target weight at least this many times uniform's: the read finds the target


class ReadProbeError(RuntimeError):
    pass


def read_probe(results_dir: Path) -> dict | None:
    """The probe record, or None when the evaluation ran none (evaluate.probe_sequences = 0, no STM model)."""
    path = results_dir / "read_probe.json"
    if not path.is_file():
        return None
    return read_record(path, "memories", dict, "a read-probe record (no `memories`)", ReadProbeError)


def verdict(memories: dict) -> str:
    first = memories.get("first") or {}
    lift, sink = first.get("lift"), first.get("sink_share")
    if lift is None:
        return ""
    if lift >= MATCHING:
        return (f"The read finds the target: its pixels put {lift:.1f}x the weight that uniform weights would on "
                "the target's memory locations, so memory frames that hold a changed look can help.")
    if sink is not None and sink > 0.5:
        return (f"The read does not find the target (on it: {lift:.1f}x uniform weights). {100 * sink:.0f}% of "
                "query locations read from one and the same memory location (an attention sink: its value "
                "summarises the whole frame, a global descriptor). Extra memory frames then change only what that "
                "summary averages over, not where the read looks, so the memory policies cannot differ much, even "
                "with perfect memory frames.")
    return (f"The read does not find the target (on it: {lift:.1f}x uniform weights), so memory frames that hold a "
            "changed look help little, even perfect ones.")


def section(results_dir: Path, report_dir: Path) -> list[str]:
    record = read_probe(results_dir)
    if record is None:
        return []
    body = []
    for name, m in record["memories"].items():
        body.append([f"`{name}`", f"{100 * m['precision']:.1f}%", f"{100 * m['chance']:.1f}%",
                     f"{m['lift']:.2f}x" if m.get("lift") is not None else "-", f"{100 * m['sink_share']:.0f}%",
                     str(m["samples"])])
    header = ["Memory (ground truth)", "Read weight on the target", "Uniform weights would give", "Ratio",
              "Query locations reading one location (sink)", "Samples (target x frame)"]
    lines = ["## Where the memory read looks (read probe)", "",
             f"The STM model's memory read (eq. 1-2) checked against the ground truth on {len(record['sequences'])} "
             "sequence(s): for each target in view at a query frame, the share of its query pixels' read weight that "
             "lands on the target in memory, against what weights that ignore the keys give (the target's share of "
             "the memory). The memory frames hold their ground truth, so this measures the read, not earlier "
             f"mistakes. `every:{record.get('every')}` is the first frame plus every {record.get('every')}th frame "
             "before the query (STM's saved frames).", "",
             *markdown_table(header, body), ""]
    if text := verdict(record["memories"]):
        lines += [text, ""]
    if record.get("picture"):
        picture = os.path.relpath(results_dir / record["picture"], report_dir)
        # Named, not embedded: results/ is a DVC output that a fresh clone of the repository lacks.
        lines += [f"Where each target's pixels at `{record.get('picture_source')}` read from its first frame "
                  f"(right, red: more weight; yellow: the target's outline): `{picture}`, written by `stm evaluate` "
                  "(a DVC output, not in git; also in the MLflow run under `read_probe/`).", ""]
    return lines
