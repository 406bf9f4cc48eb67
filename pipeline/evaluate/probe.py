"""The read probe's outputs: results/read_probe.json (+ .png) from the actors' per-sequence sums.

See stm_core.read_probe for what is measured. The JSON holds, for each probed memory (`first`,
`every:N`), the mean over (sequence, target, query frame) samples, and the same per sequence.
"""

from __future__ import annotations

from pathlib import Path

from stm_core.data.io import atomic_write_bytes, write_json_atomic
from stm_core.read_probe import ProbeTotals

JSON_NAME, PICTURE_NAME = "read_probe.json", "read_probe.png"


def _summaries(memories: dict[str, ProbeTotals]) -> dict[str, dict]:
    return {name: totals.summary() for name, totals in memories.items()}


def probe_record(probed: list[dict], every: int, model: str) -> dict:
    """probed: EvaluationWorker.probe results -> the JSON record (sequences in the order given)."""
    overall: dict[str, ProbeTotals] = {}
    sequences = {}
    for item in probed:
        mine = {name: ProbeTotals(**sums) for name, sums in item["memories"].items()}
        for name, totals in mine.items():
            overall.setdefault(name, ProbeTotals()).merge(totals)
        sequences[item["sequence"]] = _summaries(mine)
    picture = next((item for item in probed if item.get("picture")), None)
    return {"model": model, "every": every, "memories": _summaries(overall), "sequences": sequences,
            "picture": PICTURE_NAME if picture else None,
            "picture_source": f"{picture['sequence']}/{picture['picture_frame']}" if picture else None}


def write_probe(results_dir: Path, probed: list[dict], every: int, model: str) -> list[Path]:
    """Write the record and its picture (atomically); with nothing probed, remove an earlier run's."""
    if not probed:
        for name in (JSON_NAME, PICTURE_NAME):
            (results_dir / name).unlink(missing_ok=True)
        return []
    record = probe_record(probed, every, model)
    png = next((item["picture"] for item in probed if item.get("picture")), None)
    picture = results_dir / PICTURE_NAME
    if png:
        atomic_write_bytes(picture, png)
    else:
        picture.unlink(missing_ok=True)
    write_json_atomic(results_dir / JSON_NAME, record)
    return [results_dir / JSON_NAME, *([picture] if png else [])]
