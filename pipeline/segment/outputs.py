"""Where a `stm segment` run writes: one folder per video, complete or absent; `segment.json`.

`OUT/<video>/<frame>.png` palette masks, `OUT/<video>.mp4` (with `--overlay`), and in each video's
folder a `.complete.json` record (its statistics, the run settings that made it and the
fingerprint of its input files). The folder and its overlay are one unit: published together,
replaced together, and removed together when a redo fails. A local OUT:
the folder is written under a hidden temp name and renamed into place, so it is there whole or not
at all. A store URI (`s3://...`) has no rename: the folder is uploaded first and its record last,
and only a folder with its record counts as complete. A re-run skips a complete video only when
its record's settings and input fingerprint match (`why_redo`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipeline import storage
from stm_core.data.io import DAVIS_PALETTE, atomic_write_bytes

MARKER = ".complete.json"
TMP_PREFIX = ".tmp-"


class Output:
    """The output root of a run: a local folder or a store URI."""

    def __init__(self, location: str):
        self.location = location.rstrip("/") if storage.is_uri(location) else location
        self.remote = storage.is_uri(location)

    def path(self, *parts: str) -> str:
        return storage.join(self.location, *parts) if self.remote else str(Path(self.location, *parts))

    def read(self, *parts: str) -> bytes | None:
        try:
            return storage.read_bytes(self.path(*parts)) if self.remote else Path(self.path(*parts)).read_bytes()
        except (FileNotFoundError, OSError):
            return None

    def write(self, data: bytes, *parts: str) -> None:
        if self.remote:
            storage.write_bytes(self.path(*parts), data)
        else:
            atomic_write_bytes(self.path(*parts), data)

    def record(self, video: str) -> dict | None:
        """The `.complete.json` of a complete video, or None."""
        data = self.read(video, MARKER)
        try:
            return json.loads(data) if data else None
        except ValueError:
            return None

    def discard(self, video: str) -> None:
        """Remove the video's folder and overlay (an older output beside a failed redo). The record
        goes first, so a crash midway leaves an incomplete folder, never a complete-looking one."""
        if self.remote:
            try:
                fs, path = storage.filesystem(self.path(video, MARKER))
                fs.delete_file(path)
            except (FileNotFoundError, OSError):
                pass
            storage.delete_dir(self.path(video))
            self.discard_overlay(video)
            return
        final = Path(self.location) / video
        (final / MARKER).unlink(missing_ok=True)
        if final.is_dir():
            aside = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{video}-", dir=self.location))
            os.replace(final, aside / video)
            shutil.rmtree(aside, ignore_errors=True)
        self.discard_overlay(video)

    def clean_partial(self) -> int:
        """Remove temp folders a killed run left behind (local OUT only). -> how many."""
        root = Path(self.location)
        if self.remote or not root.is_dir():
            return 0
        stale = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return len(stale)

    # --------------------------------------------------------------------- one video's folder

    def staging(self, video: str) -> Path:
        """A fresh local folder to write the video's files into (beside OUT when local, so the
        rename stays on one filesystem)."""
        if self.remote:
            return Path(tempfile.mkdtemp(prefix=f"stm-segment-{video}-"))
        Path(self.location).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{video}-", dir=self.location))

    def commit(self, video: str, staged: Path, record: dict, overlay: Path | None = None) -> None:
        """Publish the staged folder as OUT/<video> (replacing an older one), its overlay as
        OUT/<video>.mp4, and the record last."""
        data = json.dumps(record, indent=1).encode()
        if self.remote:
            target = self.path(video)
            storage.delete_dir(target)  # an older, other-settings copy: its record goes first
            storage.upload_dir(staged, target)
            if overlay is None:  # an older unit's overlay does not belong to these masks
                self.discard_overlay(video)
            else:
                import pyarrow.fs as pafs

                fs, dest = storage.filesystem(self.path(f"{video}.mp4"))
                pafs.copy_files(str(overlay), dest, source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=fs)
                overlay.unlink(missing_ok=True)
            storage.write_bytes(self.path(video, MARKER), data)
            shutil.rmtree(staged, ignore_errors=True)
            return
        (staged / MARKER).write_bytes(data)
        staged.chmod(0o755)  # mkdtemp makes it owner-only; the published folder reads like any other
        final = Path(self.location) / video
        if overlay is not None:
            os.replace(overlay, Path(self.location) / f"{video}.mp4")
        else:  # an older unit's overlay does not belong to these masks
            self.discard_overlay(video)
        old = None
        if final.exists():  # --force or other settings: the old folder steps aside, then goes
            old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{video}-", dir=self.location))
            os.replace(final, old / video)
        os.replace(staged, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard_overlay(self, video: str) -> None:
        if not self.remote:
            (Path(self.location) / f"{video}.mp4").unlink(missing_ok=True)
            return
        try:
            fs, path = storage.filesystem(self.path(f"{video}.mp4"))
            fs.delete_file(path)
        except (FileNotFoundError, OSError):
            pass

    def overlay_path(self, video: str, staged: Path) -> Path:
        """Where the overlay is encoded before it is published (a temp name next to OUT)."""
        if self.remote:
            return staged.parent / f"{staged.name}.mp4"
        return Path(self.location) / f"{TMP_PREFIX}{video}-{os.getpid()}.mp4"


def why_redo(record: dict | None, key: dict, inputs: str) -> str | None:
    """None when a complete video's record was made with these settings (`Settings.key()`) from
    these input files; else what differs ("checkpoint_sha256", "inputs", "overlay", ...). A video
    made with an overlay also serves a run without one (its masks are the same)."""
    if record is None:
        return "not done"
    old = record.get("settings") or {}
    for name, value in key.items():
        if name == "overlay":
            if value and not old.get("overlay"):
                return "overlay"
        elif old.get(name) != value:
            return name
    if record.get("inputs") != inputs:
        return "inputs"
    return None


def earlier_records(out: Output) -> dict[str, dict]:
    """The per-video records of the last `segment.json` in OUT ({} when none or unreadable)."""
    data = out.read("segment.json")
    try:
        videos = json.loads(data)["videos"] if data else {}
    except (ValueError, KeyError, TypeError):
        return {}
    return videos if isinstance(videos, dict) else {}


def write_summary(out: Output, summary: dict) -> None:
    out.write(json.dumps(summary, indent=1, sort_keys=False).encode(), "segment.json")


# ----------------------------------------------------------------------------- overlays

def palette_array(palette: list[int] | None) -> np.ndarray:
    """256 x 3 uint8 colours of object ids."""
    flat = list(palette or DAVIS_PALETTE) + [0] * (768 - len(palette or DAVIS_PALETTE))
    return np.asarray(flat[:768], dtype=np.uint8).reshape(256, 3)


def draw_overlay(image: np.ndarray, ids: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """image H x W x 3 uint8, ids H x W uint8 -> the image with each object tinted in its colour
    and its outline drawn solid (easy to judge the boundary)."""
    out = image.astype(np.float32)
    fg = ids > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[ids[fg]]
    edge = np.zeros_like(fg)
    edge[:-1] |= ids[:-1] != ids[1:]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge &= fg | np.roll(fg, -1, 0) | np.roll(fg, -1, 1)
    out[edge] = colours[np.maximum(ids, np.roll(ids, -1, 0))[edge]]
    return out.clip(0, 255).astype(np.uint8)
