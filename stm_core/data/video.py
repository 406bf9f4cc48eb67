"""Video sequences and readers for DAVIS, YouTube-VOS and plain frame/mask folders.

A `VideoSequence` lists its frames in order and its annotations per frame index. Annotations may
be dense (every frame, DAVIS), periodic (YouTube-VOS train: every 5th frame) or sparse (the first
frame only, or only the frames that introduce new objects, as YouTube-VOS valid and
`davis-sample/judo`). Loading is lazy; `validate_sequence` checks everything up front.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from stm_core.data.io import DataError, read_image, read_index_mask, to_tensor

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class Stemmed(Protocol):
    """What natural_key reads of a path: a Path, or a store file that stands in for one."""

    @property
    def stem(self) -> str: ...


def natural_key(path: Stemmed) -> tuple:
    """Sort 'f2' before 'f10': numbers compare as numbers."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.stem))


@dataclass
class VideoSequence:
    """One video: frame paths in temporal order and annotation paths by frame index."""

    name: str
    frames: list[Path]
    annotations: dict[int, Path] = field(default_factory=dict)
    # Known first-annotated frame per object (YouTube-VOS meta.json); else derived from the masks.
    object_frames: dict[int, int] | None = None
    # Masks whose size differs from the frame by at most this many pixels are resized (nearest);
    # larger differences are errors. Real data has such off-by-one masks (davis-sample/judo/00005).
    size_tolerance: int = 2

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def annotated(self) -> list[int]:
        """Frame indices that have a mask, ascending."""
        return sorted(self.annotations)

    @property
    def dense(self) -> bool:
        return len(self.annotations) == len(self.frames)

    def size(self) -> tuple[int, int]:
        """(H, W) of the first frame."""
        with Image.open(self.frames[0]) as im:
            w, h = im.size
        return h, w

    def load_image(self, index: int) -> np.ndarray:
        """Frame `index` as uint8 `H x W x 3`."""
        return read_image(self.frames[index])

    def load_frame(self, index: int) -> torch.Tensor:
        """Frame `index` as float `3 x H x W` in [0, 1]."""
        return to_tensor(self.load_image(index))

    def load_mask(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray | None:
        """Ids `H x W` uint8 for an annotated frame, None otherwise. Near-miss sizes are resized."""
        path = self.annotations.get(index)
        if path is None:
            return None
        mask = read_index_mask(path)
        want = size if size is not None else self.size()
        if mask.shape != tuple(want):
            dh, dw = abs(mask.shape[0] - want[0]), abs(mask.shape[1] - want[1])
            if max(dh, dw) > self.size_tolerance:
                raise DataError(
                    f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but frame {self.frames[index]} is "
                    f"{want[1]}x{want[0]} (W x H); masks must match their frame's size"
                )
            im = Image.fromarray(mask).resize((want[1], want[0]), Image.Resampling.NEAREST)
            mask = np.asarray(im, dtype=np.uint8).copy()
        return mask

    def load_mask_tensor(self, index: int) -> torch.Tensor | None:
        mask = self.load_mask(index)
        return None if mask is None else torch.from_numpy(mask).long()

    def first_frames(self) -> dict[int, int]:
        """object id -> index of the first frame whose annotation holds it (reads the masks if needed)."""
        if self.object_frames is not None:
            return dict(self.object_frames)
        first: dict[int, int] = {}
        for index in self.annotated:
            for obj in np.unique(read_index_mask(self.annotations[index])).tolist():
                if obj != 0 and obj not in first:
                    first[obj] = index
        self.object_frames = first
        return dict(first)


# --------------------------------------------------------------------------- readers


def _frames_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith(".")),
                  key=natural_key)


def read_frame_folder(frames_dir: str | Path, masks_dir: str | Path | None = None, name: str | None = None) -> VideoSequence:
    """Generic layout: one folder of frames, an optional folder of masks matched by file stem."""
    frames_dir = Path(frames_dir)
    if not frames_dir.is_dir():
        raise DataError(f"{frames_dir}: frame folder not found")
    frames = _frames_in(frames_dir)
    if not frames:
        raise DataError(f"{frames_dir}: no frames ({', '.join(FRAME_SUFFIXES)}) in this folder")
    annotations: dict[int, Path] = {}
    if masks_dir is not None:
        masks_dir = Path(masks_dir)
        if not masks_dir.is_dir():
            raise DataError(f"{masks_dir}: mask folder not found (for frames in {frames_dir})")
        by_stem = {p.stem: i for i, p in enumerate(frames)}
        for mask in sorted(masks_dir.glob("*.png"), key=natural_key):
            if mask.name.startswith("."):
                continue
            if mask.stem not in by_stem:
                raise DataError(f"{mask}: annotation has no frame {mask.stem}.* in {frames_dir} (missing frame)")
            annotations[by_stem[mask.stem]] = mask
    return VideoSequence(name or frames_dir.name, frames, annotations)


def davis_split(root: str | Path, split: str, year: str = "2017", resolution: str = "480p") -> list[str]:
    """Sequence names of a DAVIS split: `ImageSets/<year>/<split>.txt` (names) or the DAVIS-2016
    `ImageSets/<resolution>/<split>.txt` (frame/mask path pairs)."""
    root = Path(root)
    names_file = root / "ImageSets" / year / f"{split}.txt"
    if names_file.is_file():
        return [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    pairs_file = root / "ImageSets" / resolution / f"{split}.txt"
    if pairs_file.is_file():
        names: list[str] = []
        for line in pairs_file.read_text().splitlines():
            parts = line.split()
            if parts:
                seq = Path(parts[0]).parent.name
                if seq not in names:
                    names.append(seq)
        return names
    raise DataError(f"{names_file}: split file not found (nor {pairs_file})")


def read_davis(root: str | Path, split: str | None = "val", year: str = "2017", resolution: str = "480p",
               sequences: Sequence[str] | None = None) -> list[VideoSequence]:
    """DAVIS layout: `JPEGImages/<res>/<seq>/%05d.jpg`, `Annotations/<res>/<seq>/%05d.png`.

    `split=None` (or a root without ImageSets) takes every sequence folder; `sequences` picks names.
    """
    root = Path(root)
    frames_root = root / "JPEGImages" / resolution
    masks_root = root / "Annotations" / resolution
    if not frames_root.is_dir():
        raise DataError(f"{frames_root}: not a DAVIS layout (JPEGImages/{resolution} missing)")
    if sequences is not None:
        names = list(sequences)
    elif split is not None and (root / "ImageSets").is_dir():
        names = davis_split(root, split, year, resolution)
    else:
        names = sorted(p.name for p in frames_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    videos = []
    for name in names:
        if not (frames_root / name).is_dir():
            raise DataError(f"{frames_root / name}: sequence {name!r} listed but its frame folder is missing")
        masks = masks_root / name
        videos.append(read_frame_folder(frames_root / name, masks if masks.is_dir() else None, name))
    return videos


def read_youtube_vos(root: str | Path, split: str = "train") -> list[VideoSequence]:
    """YouTube-VOS layout: `<split>/JPEGImages/<vid>/*.jpg`, `<split>/Annotations/<vid>/*.png`,
    `<split>/meta.json` (objects and the frames they are annotated in; objects may start mid-video)."""
    base = Path(root) / split
    meta_path = base / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: YouTube-VOS meta.json not found")
    try:
        meta = json.loads(meta_path.read_text())["videos"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path}: not a YouTube-VOS meta.json ({err})") from err
    videos = []
    for vid in sorted(meta):
        seq = read_frame_folder(base / "JPEGImages" / vid, base / "Annotations" / vid, vid)
        by_stem = {p.stem: i for i, p in enumerate(seq.frames)}
        first: dict[int, int] = {}
        for obj, info in meta[vid].get("objects", {}).items():
            stems = [s for s in info.get("frames", []) if s in by_stem]
            if not stems:
                raise DataError(f"{meta_path}: video {vid} object {obj}: none of its frames exist in {base / 'JPEGImages' / vid}")
            first[int(obj)] = min(by_stem[s] for s in stems)
        seq.object_frames = first
        videos.append(seq)
    return videos


# --------------------------------------------------------------------------- validation


def _check_numbering(seq: VideoSequence) -> None:
    """Frames named by number must not skip: a gap means a missing frame. A constant stride
    (YouTube-VOS train: 00000, 00005, ...) is fine; an irregular one is not."""
    numbers = []
    for p in seq.frames:
        digits = re.findall(r"\d+", p.stem)
        if not digits:
            return
        numbers.append(int(digits[-1]))
    if len(numbers) < 2:
        return
    steps = np.diff(numbers)
    stride = int(np.min(steps))
    if stride <= 0:
        raise DataError(f"{seq.frames[0].parent}: duplicate frame numbers in sequence {seq.name!r}")
    for i, step in enumerate(steps):
        if step != stride:
            missing = numbers[i] + stride
            raise DataError(
                f"{seq.frames[i].parent}: frame number {missing} is missing between {seq.frames[i].name} and "
                f"{seq.frames[i + 1].name} (frames step by {stride} elsewhere)"
            )


def validate_sequence(seq: VideoSequence, check_pixels: bool = True) -> list[str]:
    """Check a sequence; raise `DataError` naming the file on the first hard error, return warnings.

    Checks: frames exist, decode fully (no truncation) and share one size; numbered frames have no
    gaps; masks are 'P'/'L' (not RGB), match the frame size (within `size_tolerance` pixels, else an
    error); the first annotated frame holds at least one object; and object ids keep their meaning:
    an id that vanishes while a new id appears on the frame right after, covering most of where the
    old one was (IoU >= 0.5), is a re-labelled object and an error.
    """
    warnings: list[str] = []
    if not seq.frames:
        raise DataError(f"sequence {seq.name!r}: no frames")
    _check_numbering(seq)
    size = None
    for path in seq.frames:
        if check_pixels:
            h, w = read_image(path).shape[:2]
        else:
            with Image.open(path) as im:
                w, h = im.size
        if size is None:
            size = (h, w)
        elif (h, w) != size:
            raise DataError(f"{path}: frame is {w}x{h} but {seq.frames[0].name} is {size[1]}x{size[0]} (W x H)")
    if not seq.annotations:
        return warnings
    assert size is not None, "a sequence with frames has a frame size"  # seq.frames is not empty
    previous: tuple[int, np.ndarray] | None = None
    for index in seq.annotated:
        path = seq.annotations[index]
        raw = read_index_mask(path)  # raises on RGB masks, with the fix
        if raw.shape != size:
            warnings.append(f"{path}: mask is {raw.shape[1]}x{raw.shape[0]}, frame is {size[1]}x{size[0]}; resized")
        mask = seq.load_mask(index, size)  # raises if beyond tolerance
        assert mask is not None, f"{path}: an annotated frame has a mask"  # index is in seq.annotated
        ids = set(np.unique(mask).tolist()) - {0}
        if previous is None and not ids:
            raise DataError(f"{path}: the first annotated frame of {seq.name!r} holds no object (all background)")
        if previous is not None and previous[0] == index - 1:
            _check_relabel(path, previous[1], mask)
        previous = (index, mask)
    return warnings


def _check_relabel(path: Path, before: np.ndarray, after: np.ndarray) -> None:
    old_ids = set(np.unique(before).tolist()) - {0}
    new_ids = set(np.unique(after).tolist()) - {0}
    for gone in old_ids - new_ids:
        region = before == gone
        for born in new_ids - old_ids:
            other = after == born
            iou = np.logical_and(region, other).sum() / max(np.logical_or(region, other).sum(), 1)
            if iou >= 0.5:
                raise DataError(
                    f"{path}: object id {gone} vanishes and id {born} appears in its place (IoU {iou:.2f} with "
                    f"the previous frame): an object must keep one id for the whole video"
                )


def validate_videos(videos: Sequence[VideoSequence], check_pixels: bool = True) -> list[str]:
    warnings: list[str] = []
    for seq in videos:
        warnings += validate_sequence(seq, check_pixels)
    return warnings
