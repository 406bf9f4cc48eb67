"""Finished evaluation items kept across runs, so nothing finished is lost and a re-run does the rest.

DVC empties a stage's outputs (results/) before it runs the stage again, so the records live beside
them, in `results.partial/` (git-ignored, not a DVC output). One folder per finished item, named by
a digest of everything its result depends on (the variant, the checkpoint's sha256, the settings
that change masks or scores, the sequence and its frame count): a record is reused only for the
same work. Each folder appears whole or not at all (written aside, then renamed). A stage that
finishes deletes the folder; one that fails or is stopped leaves it for the re-run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.evaluate.worker import SequenceResult
from stm_core.scoring.sequences import SequenceScores

META = "result.json"


def records_dir(results_dir: Path) -> Path:
    """results/ -> results.partial/ (its sibling: DVC leaves it alone)."""
    return results_dir.parent / f"{results_dir.name}.partial"


def item_digest(**inputs: object) -> str:
    """A stable name for one item's inputs (JSON-able values)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ItemRecords:
    def __init__(self, root: Path):
        self.root = root

    def _folder(self, digest: str) -> Path:
        return self.root / digest

    def has(self, digest: str) -> bool:
        return (self._folder(digest) / META).is_file()

    def save(self, digest: str, meta: dict, blobs: dict[str, bytes]) -> None:
        """Write one record (a JSON dict and named binary files) atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=self.root))
        for name, data in blobs.items():
            (tmp / name).write_bytes(data)
        # NaN scores stay NaN; numpy scalars become numbers
        (tmp / META).write_text(json.dumps({**meta, "blobs": list(blobs)}, default=lambda v: v.item()))
        final = self._folder(digest)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def load(self, digest: str) -> tuple[dict, dict[str, bytes]]:
        folder = self._folder(digest)
        meta = json.loads((folder / META).read_text())
        return meta, {name: (folder / name).read_bytes() for name in meta.pop("blobs")}

    def count(self) -> int:
        return sum(1 for p in self.root.glob(f"*/{META}")) if self.root.is_dir() else 0

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def result_record(result: SequenceResult) -> tuple[dict, dict[str, bytes]]:
    """SequenceResult -> (meta, blobs): masks as their PNG files, scores as lists."""
    meta = {k: v for k, v in asdict(result).items() if k not in ("masks", "scores")}
    s = result.scores
    meta["scores"] = {"name": s.name, "object_ids": [int(o) for o in s.object_ids], "frames": list(s.frames),
                      "J": np.asarray(s.J).tolist(), "F": np.asarray(s.F).tolist()}
    blobs = {f"{i:05d}.png": png for i, png in enumerate(result.masks)}
    return meta, blobs


def record_result(meta: dict, blobs: dict[str, bytes]) -> SequenceResult:
    """The inverse of result_record."""
    meta = dict(meta)
    s = meta.pop("scores")
    objects = len(s["object_ids"])
    scores = SequenceScores(s["name"], s["object_ids"], s["frames"],
                            np.asarray(s["J"], dtype=np.float64).reshape(objects, len(s["frames"])),
                            np.asarray(s["F"], dtype=np.float64).reshape(objects, len(s["frames"])))
    masks = [blobs[name] for name in sorted(blobs)]
    return SequenceResult(masks=masks, scores=scores, **meta)
