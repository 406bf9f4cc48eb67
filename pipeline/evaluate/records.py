"""Finished evaluation items kept across runs, so nothing finished is lost and a re-run does the rest.

DVC empties a stage's outputs (results/) before it runs the stage again, so the records live beside
them, in `results.partial/` (git-ignored, not a DVC output), or with `storage.root` set at
`<root>/results.partial/`: a cluster deleted after a failure (a RayJob's `shutdownAfterJobFinishes`)
takes no finished item with it, and the re-run on a new cluster evaluates only the missing ones.
One folder per finished item, named by a digest of everything its result depends on (the variant,
the checkpoint's sha256, the settings that change masks or scores, the sequence and its frame
count): a record is reused only for the same work. Each record appears whole or not at all (a
folder written aside, then renamed; in the store its `result.json` is written last and is what
marks it finished). A stage that finishes deletes the records; one that fails or is stopped leaves
them for the re-run.
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

from pipeline import storage
from pipeline.evaluate.worker import SequenceResult
from stm_core.scoring.sequences import SequenceScores

META = "result.json"


def records_dir(results_dir: Path, store_root: str = "", workspace: Path | None = None) -> Path | str:
    """results/ -> results.partial/ (its sibling: DVC leaves it alone); with a store, its mirror there."""
    local = results_dir.parent / f"{results_dir.name}.partial"
    mirror = storage.remote_mirror(store_root, workspace or Path.cwd(), local) if store_root else None
    return mirror or local


def item_digest(**inputs: object) -> str:
    """A stable name for one item's inputs (JSON-able values)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ItemRecords:
    """The records in a local folder or under a store URI."""

    def __init__(self, root: Path | str):
        self.root = root
        self.remote = storage.is_uri(root)

    def _folder(self, digest: str) -> Path:
        return Path(self.root) / digest

    def has(self, digest: str) -> bool:
        if self.remote:
            return storage.exists(storage.join(str(self.root), digest, META))
        return (self._folder(digest) / META).is_file()

    def save(self, digest: str, meta: dict, blobs: dict[str, bytes]) -> None:
        """Write one record (a JSON dict and named binary files) atomically."""
        # NaN scores stay NaN; numpy scalars become numbers
        text = json.dumps({**meta, "blobs": list(blobs)}, default=lambda v: v.item())
        if self.remote:
            for name, data in blobs.items():
                storage.write_bytes(storage.join(str(self.root), digest, name), data)
            storage.write_bytes(storage.join(str(self.root), digest, META), text.encode())  # last: the record is whole
            return
        root = Path(self.root)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=root))
        for name, data in blobs.items():
            (tmp / name).write_bytes(data)
        (tmp / META).write_text(text)
        final = self._folder(digest)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def _read(self, digest: str, name: str) -> bytes:
        if self.remote:
            return storage.read_bytes(storage.join(str(self.root), digest, name))
        return (self._folder(digest) / name).read_bytes()

    def load(self, digest: str) -> tuple[dict, dict[str, bytes]]:
        meta = json.loads(self._read(digest, META))
        return meta, {name: self._read(digest, name) for name in meta.pop("blobs")}

    def count(self) -> int:
        if self.remote:
            return sum(1 for f in storage.list_files(str(self.root)) if f.endswith(f"/{META}"))
        root = Path(self.root)
        return sum(1 for p in root.glob(f"*/{META}")) if root.is_dir() else 0

    def clear(self) -> None:
        if self.remote:
            storage.delete_dir(str(self.root))
        else:
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
