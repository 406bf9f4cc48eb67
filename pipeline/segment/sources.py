"""The videos of a `stm segment` run: found on the driver, read frame by frame on a worker.

Listed on the driver by pipeline.segment.listing. Two layouts. `--dataset ROOT`: DAVIS or
YouTube-VOS (stm_core.data.video), one folder of frames per video. `--videos DIR`: video files (`clip.mp4`), each with its first-frame index mask `clip.png`
beside it, or a folder `clip/` of masks named by frame number (`00000.png`, `00120.png`, ...) for
objects that enter later. A `VideoJob` names files relative to the root, so a worker on any node
reads them itself (`tree.Inputs`: a store file is fetched when read, into a bounded per-process
cache; nothing copies the root).

At an annotated frame after the first, only the objects it introduces are taken from its mask
(DAVIS annotates every frame: the ground truth of known objects is not fed back in).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.segment.tree import Inputs
from stm_core.data.io import DataError, image_size, read_frame, read_index_mask, to_tensor
from stm_core.data.video_file import check_complete, timed_frames

SIZE_TOLERANCE = 2  # masks this many pixels off their frame's size are resized (as stm_core.data.video)


@dataclass
class VideoJob:
    """One video to segment; paths are relative to `root` (a local folder or a store URI)."""

    name: str
    root: str
    frames: list[str] = field(default_factory=list)  # frame files (a folder of frames), in order
    video: str = ""  # a video file (instead of frames)
    annotations: dict[int, str] = field(default_factory=dict)  # frame index -> index-mask PNG
    object_frames: dict[int, int] | None = None  # object id -> frame that introduces it (YouTube-VOS meta)
    length: int = 0  # frames (a video file's header count)
    fps: float = 25.0
    expected_mask: str = ""  # where the first-frame mask was looked for (for the error message)
    cost: float = 0.0  # scheduling weight (longest first)
    inputs: str = ""  # fingerprint of the input files (pipeline.segment.listing): a changed file redoes the video

    @property
    def source(self) -> str:
        """The file or folder a message about this video names."""
        rel = self.video or (str(Path(self.frames[0]).parent) if self.frames else self.name)
        return f"{self.root.rstrip('/')}/{rel}"


# ----------------------------------------------------------------------------- the worker: read them

def object_count(job: VideoJob) -> int:
    """Objects of the video when the listing knows them (YouTube-VOS meta), else 1: a scheduling
    hint that reads no file."""
    return len(job.object_frames) if job.object_frames else 1


@contextmanager
def named(inputs: Inputs) -> Iterator[None]:
    """Errors name store files by their URI, not by this process's cached copy."""
    try:
        yield
    except DataError as err:
        raise DataError(inputs.unname(str(err))) from err


def measure(job: VideoJob, inputs: Inputs) -> tuple[int, int]:
    """Fill in a video file's length and rate from its header; -> (H, W) of the frames (upright).
    DataError naming the file if unreadable or truncated (its packets are read, not decoded: a
    truncated file fails before any frame is segmented)."""
    if job.video:
        with named(inputs):
            info = check_complete(inputs.path(job.video))
        job.length, job.fps = info.frames, info.fps
        return info.height, info.width
    with named(inputs):
        return image_size(inputs.path(job.frames[0]))


def frame_names(job: VideoJob) -> Iterator[str]:
    """Output names (stems): the frames' own, or the frame number of a video file."""
    if job.frames:
        yield from (Path(f).stem for f in job.frames)
    else:
        t = 0
        while True:
            yield f"{t:05d}"
            t += 1


def stream_frames(job: VideoJob, inputs: Inputs) -> Iterator[tuple[torch.Tensor, float | None]]:
    """(frame as float `3 x H x W` in [0, 1], its time in seconds or None), one at a time (as
    `stm segment --frames` reads them); a video file's frames upright and with their own times."""
    with named(inputs):
        if job.video:
            for image, when in timed_frames(inputs.path(job.video)):
                yield to_tensor(image), when
        else:
            for rel in job.frames:
                yield read_frame(inputs.path(rel)), None


def load_given(job: VideoJob, inputs: Inputs, size: tuple[int, int],
               ) -> tuple[dict[int, torch.Tensor], list[int] | None]:
    """The masks the network starts from: {frame: H x W ids} of the objects each annotated frame
    introduces, and the first mask's palette. Errors name the mask file."""
    if 0 not in job.annotations:
        raise DataError(f"{job.root.rstrip('/')}/{job.expected_mask}: no first-frame mask for {job.source} "
                        "(an index PNG of the objects to segment)")
    given: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    palette = None
    for t in sorted(job.annotations):
        path = inputs.where(job.annotations[t])
        if job.length and t >= job.length:
            raise DataError(f"{path}: annotates frame {t}, but {job.source} has {job.length} frames")
        with named(inputs):
            ids = read_index_mask(inputs.path(job.annotations[t]))
        if palette is None:
            with Image.open(inputs.path(job.annotations[t])) as im:
                palette = im.getpalette() if im.mode == "P" else None
        if ids.shape != size:
            if max(abs(ids.shape[0] - size[0]), abs(ids.shape[1] - size[1])) > SIZE_TOLERANCE:
                raise DataError(f"{path}: mask is {ids.shape[1]}x{ids.shape[0]} but the frames of {job.source} "
                                f"are {size[1]}x{size[0]} (W x H)")
            resized = Image.fromarray(ids).resize((size[1], size[0]), Image.Resampling.NEAREST)
            ids = np.asarray(resized, dtype=np.uint8)
        if job.object_frames is not None:
            new = [o for o, first in job.object_frames.items() if first == t]
        else:
            new = sorted(set(np.unique(ids).tolist()) - {0, 255} - seen)
        seen.update(new)
        if t == 0 and not new:
            raise DataError(f"{path}: the first-frame mask of {job.source} holds no object (all background)")
        if new:
            given[t] = torch.from_numpy(np.where(np.isin(ids, new), ids, 0).astype(np.int64))
    return given, palette
