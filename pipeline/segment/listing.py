"""The driver's list of videos for `stm segment --dataset/--videos`: one `VideoJob` per video, or
that video's error.

A fault of one video (a YouTube-VOS video without its `Annotations/` folder, a mask with no
matching frame, a listed DAVIS sequence without a frame folder, a mask in `clip/` not named by a
number, `clip.mp4` beside `clip.mov`) is that video's error: the listing goes on with the others.
Only a root that is not a dataset at all (no folder, no `meta.json`, no split file) stops the run.

Each job carries a fingerprint of its input files (relative names, sizes, modification times): a
re-run redoes a video whose files changed (a fixed mask, a replaced video) even when the settings
are the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from pipeline.segment.sources import VideoJob
from stm_core.data.io import DataError
from stm_core.data.video import VideoSequence, davis_split, read_frame_folder
from stm_core.data.video_file import VIDEO_SUFFIXES

DAVIS_FPS = 24.0  # DAVIS frames are the source videos' every frame, at 24 fps
YOUTUBE_VOS_FPS = 30.0  # YouTube-VOS sources are 30 fps; its folders hold every 5th frame (6 fps)

Listing = tuple[list[VideoJob], dict[str, str]]  # (videos to run, {video: its error})


def fingerprint(local: Path, rels: list[str]) -> str:
    """A digest of the files' relative names, sizes and modification times (no file is read)."""
    digest = hashlib.sha256()
    for rel in sorted(rels):
        st = os.stat(local / rel)
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def frame_step(frames: list[Path]) -> int:
    """The step between the numbers of consecutive frames (1 when they are not numbered)."""
    numbers = [int(m[-1]) for m in (re.findall(r"\d+", p.stem) for p in frames[:2]) if m]
    return max(1, numbers[1] - numbers[0]) if len(numbers) == 2 else 1


def _job(seq: VideoSequence, root: str, local: Path, masks: str, fps: float) -> VideoJob:
    def rel(p: Path) -> str:
        return p.relative_to(local).as_posix()

    frames, annotations = [rel(p) for p in seq.frames], {t: rel(p) for t, p in seq.annotations.items()}
    return VideoJob(name=seq.name, root=root, frames=frames, annotations=annotations,
                    object_frames=seq.object_frames, length=len(seq), fps=fps,
                    expected_mask=f"{masks}/{seq.name}/{seq.frames[0].stem}.png",
                    inputs=fingerprint(local, frames + list(annotations.values())))


def dataset_jobs(root: str, local: Path, fmt: str = "auto", split: str = "val", year: str = "2017",
                 resolution: str = "480p", sequences: list[str] | None = None, fps: float | None = None) -> Listing:
    """DAVIS or YouTube-VOS videos under `local` (the driver's copy of `root`). `fps`: the overlay's
    frame rate (default: the dataset's own)."""
    if not local.is_dir():
        raise DataError(f"{local}: dataset folder not found")
    if fmt == "auto":
        fmt = "davis" if (local / "JPEGImages").is_dir() else "youtube-vos"
    if fmt == "davis":
        return _davis(root, local, split, year, resolution, sequences, fps)
    return _youtube_vos(root, local, split, sequences, fps)


def _davis(root: str, local: Path, split: str, year: str, resolution: str, sequences: list[str] | None,
           fps: float | None) -> Listing:
    frames_root, masks_root = local / "JPEGImages" / resolution, local / "Annotations" / resolution
    if not frames_root.is_dir():
        raise DataError(f"{frames_root}: not a DAVIS layout (JPEGImages/{resolution} missing)")
    if sequences:
        names = list(sequences)
    elif (local / "ImageSets").is_dir():
        names = davis_split(local, split, year, resolution)
    else:
        names = sorted(p.name for p in frames_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    jobs, failed = [], {}
    for name in names:
        try:
            if not (frames_root / name).is_dir():
                raise DataError(f"{frames_root / name}: sequence {name!r} listed but its frame folder is missing")
            masks = masks_root / name
            seq = read_frame_folder(frames_root / name, masks if masks.is_dir() else None, name)
            jobs.append(_job(seq, root, local, f"Annotations/{resolution}", fps or DAVIS_FPS))
        except (DataError, OSError) as err:
            failed[name] = str(err)
    return jobs, failed


def _youtube_vos(root: str, local: Path, split: str, sequences: list[str] | None, fps: float | None) -> Listing:
    base = local / split
    meta_path = base / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: YouTube-VOS meta.json not found")
    try:
        meta = json.loads(meta_path.read_text())["videos"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path}: not a YouTube-VOS meta.json ({err})") from err
    jobs, failed = [], {}
    for vid in sequences or sorted(meta):
        try:
            if vid not in meta:
                raise DataError(f"{meta_path}: video {vid!r} is not listed")
            seq = read_frame_folder(base / "JPEGImages" / vid, base / "Annotations" / vid, vid)
            by_stem = {p.stem: i for i, p in enumerate(seq.frames)}
            first: dict[int, int] = {}
            for obj, info in meta[vid].get("objects", {}).items():
                stems = [s for s in info.get("frames", []) if s in by_stem]
                if not stems:
                    raise DataError(f"{meta_path}: video {vid} object {obj}: none of its frames exist in "
                                    f"{base / 'JPEGImages' / vid}")
                first[int(obj)] = min(by_stem[s] for s in stems)
            seq.object_frames = first
            jobs.append(_job(seq, root, local, f"{split}/Annotations", fps or YOUTUBE_VOS_FPS / frame_step(seq.frames)))
        except (DataError, OSError, TypeError, ValueError) as err:
            failed[vid] = str(err)
    return jobs, failed


def video_file_jobs(root: str, local: Path, names: list[str] | None = None) -> Listing:
    """Video files in `local` with their masks (`<name>.png` and/or `<name>/<frame number>.png`).
    A video without any mask is still listed: its worker reports the missing first-frame mask."""
    if not local.is_dir():
        raise DataError(f"{local}: videos folder not found")
    files = sorted(p for p in local.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith("."))
    by_stem: dict[str, list[Path]] = {}
    for p in files:
        by_stem.setdefault(p.stem, []).append(p)
    failed = {n: f"{local}/{n}.*: no video file named {n} (looked for {', '.join(VIDEO_SUFFIXES)})"
              for n in names or [] if n not in by_stem}
    if not by_stem:
        raise DataError(f"{local}: no video files ({', '.join(VIDEO_SUFFIXES)}) in this folder")
    jobs = []
    for stem, paths in by_stem.items():
        if names and stem not in names:
            continue
        if len(paths) > 1:  # outputs are named by stem: both would write OUT/<stem>/
            failed[stem] = (f"{', '.join(str(p) for p in paths)}: {len(paths)} videos named {stem!r} (outputs are "
                            "named by the file's stem); rename all but one")
            continue
        path = paths[0]
        try:
            annotations: dict[int, str] = {}
            folder = local / stem
            if folder.is_dir():
                for mask in sorted(folder.glob("*.png")):
                    if not mask.stem.isdigit():
                        raise DataError(f"{mask}: masks of {path.name} are named by frame number "
                                        "(00000.png, 00120.png)")
                    annotations[int(mask.stem)] = f"{stem}/{mask.name}"
            if (local / f"{stem}.png").is_file():
                annotations.setdefault(0, f"{stem}.png")
            jobs.append(VideoJob(name=stem, root=root, video=path.name, annotations=annotations,
                                 expected_mask=f"{stem}.png",
                                 inputs=fingerprint(local, [path.name, *annotations.values()])))
        except (DataError, OSError) as err:
            failed[stem] = str(err)
    return jobs, failed
