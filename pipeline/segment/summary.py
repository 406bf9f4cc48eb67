"""`OUT/segment.json`: the run's settings, counts, and every video's last record.

Videos of this run come first, in listing order; videos that earlier runs into the same OUT
recorded and this run did not list (a `--sequences` subset, a video since removed) keep their last
record, marked `"earlier_run": true`, so the file always lists every video OUT holds a word on.
The counts (`done`, `skipped`, `failed`, `interrupted`, `pending`) are this run's; `earlier` counts
the kept records.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.segment.outputs import Output, earlier_records, write_summary

# Statuses of a video's record in segment.json.
DONE, FAILED, PENDING, INTERRUPTED = "done", "failed", "pending", "interrupted"


def failure(error: str) -> dict:
    return {"status": FAILED, "error": error}


class RunSummary:
    """The records of one run over `names` (this run's videos, in order), on top of OUT's earlier ones."""

    def __init__(self, out: Output, head: dict, names: list[str]):
        self.out, self.head = out, head
        self.names = list(dict.fromkeys(names))
        self.earlier = {k: v for k, v in earlier_records(out).items() if k not in set(self.names)}
        self.records: dict[str, dict] = {}

    def set(self, name: str, record: dict) -> None:
        self.records[name] = record

    def interrupt(self, why: str, finished: Callable[[str], dict | None] = lambda name: None) -> list[str]:
        """Mark every video of this run without a final record as interrupted; -> their names.
        `finished(name)`: the record of a video whose complete output was published before the stop
        reached the driver (it is done, not interrupted), else None."""
        left = []
        for name in [n for n in self.names if self.records.get(n, {}).get("status", PENDING) == PENDING]:
            record = finished(name)
            if record is not None:
                self.records[name] = record
            else:
                self.records[name] = {"status": INTERRUPTED, "error": why}
                left.append(name)
        return left

    def as_dict(self) -> dict:
        videos = {n: self.records.get(n, {"status": PENDING}) for n in self.names}
        done = [r for r in videos.values() if r.get("status") == DONE]

        def count(status: str) -> int:
            return sum(1 for r in videos.values() if r.get("status") == status)

        counts = {"videos": len(videos), "done": sum(1 for r in done if not r.get("skipped")),
                  "skipped": sum(1 for r in done if r.get("skipped")), "failed": count(FAILED),
                  "interrupted": count(INTERRUPTED), "pending": count(PENDING), "earlier": len(self.earlier),
                  "frames": sum(r.get("frames", 0) for r in done),
                  "seconds": round(sum(r.get("seconds", 0.0) for r in done), 3)}
        kept = {n: {**r, "earlier_run": True} for n, r in self.earlier.items()}
        return {**self.head, "summary": counts, "videos": {**videos, **kept}}

    def write(self) -> dict:
        data = self.as_dict()
        write_summary(self.out, data)
        return data
