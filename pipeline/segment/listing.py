"""The driver's list of videos for `stm segment --dataset/--videos`: one `VideoJob` per video, or
that video's error.

A fault of one video (a YouTube-VOS video without its `Annotations/` folder, a mask with no
matching frame, a listed DAVIS sequence without a frame folder, a mask in `clip/` not named by a
number, `clip.mp4` beside `clip.mov`) is that video's error: the listing goes on with the others.
Only a root that is not a dataset at all (no folder, no `meta.json`, no split file) stops the run.

Everything is read from one listing of the root (pipeline.segment.tree): no frame, mask or video
is opened here, so a store dataset is listed without being copied. Each job carries a fingerprint
of its input files (relative names, sizes, modification times): a re-run redoes a video whose files
changed (a fixed mask, a replaced video) even when the settings are the same.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath

from pipeline.segment.sources import VideoJob
from pipeline.segment.tree import Tree
from stm_core.data.io import DataError
from stm_core.data.video import FRAME_SUFFIXES, natural_key
from stm_core.data.video_file import VIDEO_SUFFIXES

DAVIS_FPS = 24.0  # DAVIS frames are the source videos' every frame, at 24 fps
YOUTUBE_VOS_FPS = 30.0  # YouTube-VOS sources are 30 fps; its folders hold every 5th frame (6 fps)

Listing = tuple[list[VideoJob], dict[str, str]]  # (videos to run, {video: its error})


def frame_step(frames: list[str]) -> int:
    """The step between the numbers of consecutive frames (1 when they are not numbered)."""
    numbers = [int(m[-1]) for m in (re.findall(r"\d+", PurePosixPath(p).stem) for p in frames[:2]) if m]
    return max(1, numbers[1] - numbers[0]) if len(numbers) == 2 else 1


def frame_folder(tree: Tree, frames_dir: str, masks_dir: str | None, name: str, masks_name: str, fps: float,
                 object_frames: dict[int, int] | None = None) -> VideoJob:
    """One video of frames `frames_dir/*.jpg` and masks `masks_dir/<frame stem>.png` (as
    stm_core.data.video.read_frame_folder reads a local folder)."""
    if not tree.is_dir(frames_dir):
        raise DataError(f"{tree.where(frames_dir)}: frame folder not found")
    frames = sorted((p for p in tree.names(frames_dir) if p.suffix.lower() in FRAME_SUFFIXES), key=natural_key)
    if not frames:
        raise DataError(f"{tree.where(frames_dir)}: no frames ({', '.join(FRAME_SUFFIXES)}) in this folder")
    annotations: dict[int, str] = {}
    if masks_dir is not None:
        if not tree.is_dir(masks_dir):
            raise DataError(f"{tree.where(masks_dir)}: mask folder not found (for frames in {tree.where(frames_dir)})")
        by_stem = {p.stem: i for i, p in enumerate(frames)}
        for mask in sorted((p for p in tree.names(masks_dir) if p.suffix == ".png"), key=natural_key):
            if mask.stem not in by_stem:
                raise DataError(f"{tree.where(str(mask))}: annotation has no frame {mask.stem}.* in "
                                f"{tree.where(frames_dir)} (missing frame)")
            annotations[by_stem[mask.stem]] = str(mask)
    rels = [str(p) for p in frames]
    return VideoJob(name=name, root=tree.root, frames=rels, annotations=annotations, object_frames=object_frames,
                    length=len(rels), fps=fps, expected_mask=f"{masks_name}/{name}/{frames[0].stem}.png",
                    inputs=tree.fingerprint(rels + list(annotations.values())))


def dataset_jobs(tree: Tree, fmt: str = "auto", split: str = "val", year: str = "2017", resolution: str = "480p",
                 sequences: list[str] | None = None, fps: float | None = None) -> Listing:
    """DAVIS or YouTube-VOS videos of the listed root. `fps`: the overlay's frame rate (default:
    the dataset's own)."""
    if fmt == "auto":
        fmt = "davis" if tree.is_dir("JPEGImages") else "youtube-vos"
    if fmt == "davis":
        return _davis(tree, split, year, resolution, sequences, fps)
    return _youtube_vos(tree, split, sequences, fps)


def davis_names(tree: Tree, split: str, year: str, resolution: str) -> list[str]:
    """The split's sequences (ImageSets/<year>/<split>.txt, or the 2016 pairs file), as
    stm_core.data.video.davis_split reads them."""
    names_file, pairs_file = f"ImageSets/{year}/{split}.txt", f"ImageSets/{resolution}/{split}.txt"
    if tree.has(names_file):
        return [line.strip() for line in tree.read_text(names_file).splitlines() if line.strip()]
    if tree.has(pairs_file):
        names: list[str] = []
        for line in tree.read_text(pairs_file).splitlines():
            if line.split() and PurePosixPath(line.split()[0]).parent.name not in names:
                names.append(PurePosixPath(line.split()[0]).parent.name)
        return names
    raise DataError(f"{tree.where(names_file)}: split file not found (nor {tree.where(pairs_file)})")


def _davis(tree: Tree, split: str, year: str, resolution: str, sequences: list[str] | None,
           fps: float | None) -> Listing:
    frames_root, masks_root = f"JPEGImages/{resolution}", f"Annotations/{resolution}"
    if not tree.is_dir(frames_root):
        raise DataError(f"{tree.where(frames_root)}: not a DAVIS layout (JPEGImages/{resolution} missing)")
    if sequences:
        names = list(sequences)
    elif tree.is_dir("ImageSets"):
        names = davis_names(tree, split, year, resolution)
    else:
        names = tree.dirs(frames_root)
    jobs, failed = [], {}
    for name in names:
        try:
            frames = f"{frames_root}/{name}"
            if not tree.is_dir(frames):
                raise DataError(f"{tree.where(frames)}: sequence {name!r} listed but its frame folder is missing")
            masks = f"{masks_root}/{name}"
            jobs.append(frame_folder(tree, frames, masks if tree.is_dir(masks) else None, name, masks_root,
                                     fps or DAVIS_FPS))
        except DataError as err:
            failed[name] = str(err)
    return jobs, failed


def _youtube_vos(tree: Tree, split: str, sequences: list[str] | None, fps: float | None) -> Listing:
    meta_path = f"{split}/meta.json"
    if not tree.has(meta_path):
        raise DataError(f"{tree.where(meta_path)}: YouTube-VOS meta.json not found")
    try:
        meta = json.loads(tree.read_text(meta_path))["videos"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{tree.where(meta_path)}: not a YouTube-VOS meta.json ({err})") from err
    jobs, failed = [], {}
    for vid in sequences or sorted(meta):
        try:
            if vid not in meta:
                raise DataError(f"{tree.where(meta_path)}: video {vid!r} is not listed")
            job = frame_folder(tree, f"{split}/JPEGImages/{vid}", f"{split}/Annotations/{vid}", vid,
                               f"{split}/Annotations", fps or 0.0)
            by_stem = {PurePosixPath(f).stem: i for i, f in enumerate(job.frames)}
            first: dict[int, int] = {}
            for obj, info in meta[vid].get("objects", {}).items():
                stems = [s for s in info.get("frames", []) if s in by_stem]
                if not stems:
                    raise DataError(f"{tree.where(meta_path)}: video {vid} object {obj}: none of its frames exist "
                                    f"in {tree.where(f'{split}/JPEGImages/{vid}')}")
                first[int(obj)] = min(by_stem[s] for s in stems)
            job.object_frames = first
            job.fps = fps or YOUTUBE_VOS_FPS / frame_step(job.frames)
            jobs.append(job)
        except (DataError, TypeError, ValueError, AttributeError) as err:
            failed[vid] = str(err)
    return jobs, failed


def video_file_jobs(tree: Tree, names: list[str] | None = None) -> Listing:
    """Video files at the top of the root with their masks (`<name>.png` and/or
    `<name>/<frame number>.png`). A video without any mask is still listed: its worker reports the
    missing first-frame mask."""
    files = [p for p in tree.names("") if p.suffix.lower() in VIDEO_SUFFIXES]
    by_stem: dict[str, list[PurePosixPath]] = {}
    for p in files:
        by_stem.setdefault(p.stem, []).append(p)
    failed = {n: f"{tree.where(n)}.*: no video file named {n} (looked for {', '.join(VIDEO_SUFFIXES)})"
              for n in names or [] if n not in by_stem}
    if not by_stem:
        raise DataError(f"{tree.where('')}: no video files ({', '.join(VIDEO_SUFFIXES)}) in this folder")
    jobs = []
    for stem, paths in by_stem.items():
        if names and stem not in names:
            continue
        if len(paths) > 1:  # outputs are named by stem: both would write OUT/<stem>/
            failed[stem] = (f"{', '.join(tree.where(str(p)) for p in paths)}: {len(paths)} videos named {stem!r} "
                            "(outputs are named by the file's stem); rename all but one")
            continue
        path = paths[0]
        try:
            annotations: dict[int, str] = {}
            for mask in tree.names(stem):
                if mask.suffix != ".png":
                    continue
                if not mask.stem.isdigit():
                    raise DataError(f"{tree.where(str(mask))}: masks of {path.name} are named by frame number "
                                    "(00000.png, 00120.png)")
                annotations[int(mask.stem)] = str(mask)
            if tree.has(f"{stem}.png"):
                annotations.setdefault(0, f"{stem}.png")
            jobs.append(VideoJob(name=stem, root=tree.root, video=str(path), annotations=annotations,
                                 expected_mask=f"{stem}.png", inputs=tree.fingerprint([str(path), *annotations.values()])))
        except DataError as err:
            failed[stem] = str(err)
    return jobs, failed
