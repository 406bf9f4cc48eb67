"""Video files (.mp4, .mkv, ...) read and written one frame at a time with PyAV (FFmpeg).

`probe(path)` reads the header and the first frame (size as displayed, frame count, rate,
rotation); `read_frames(path)` yields decoded RGB frames one by one, so a video of any length never
sits in memory whole; `timed_frames(path)` also gives each frame's time. Frames come upright: a
rotation in the file's display matrix (phone videos) is applied, so sizes, masks and overlays are
in the orientation a player shows. `check_complete(path)` reads the packets without decoding and
finds a truncated file before any work. `VideoWriter` encodes frames one by one (H.264 when FFmpeg
has it, else MPEG-4 Part 2), at given times when the source's are kept (variable frame rate).
Errors name the file: a file FFmpeg cannot open, a frame it cannot decode, and a file that ends
before the frame count (or duration) its header promises (truncated).

(Folders of frames, DAVIS and YouTube-VOS, are read by `stm_core.data.video`.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from stm_core.data.io import DataError

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
TIME_BASE = Fraction(1, 90000)  # the written videos' clock (MPEG's 90 kHz)


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    frames: int  # from the header: exact for MP4/MOV, estimated from duration x rate otherwise (0: unknown)
    width: int
    height: int  # width and height as displayed (after the rotation)
    fps: float
    rotation: int = 0  # degrees counterclockwise the display turns the stored frames (a multiple of 90)


def _av():
    try:
        import av
    except ModuleNotFoundError as err:  # pragma: no cover - av is a project dependency
        raise DataError("reading video files needs PyAV: pip install av") from err
    return av


def probe(path: str | Path) -> VideoInfo:
    """Size, frame count and rate from the container header (no decoding)."""
    av = _av()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: video file not found")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: no video stream in this file")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
            frames = int(stream.frames or 0)
            if frames == 0 and stream.duration is not None and stream.time_base is not None:
                frames = int(round(float(stream.duration * stream.time_base) * rate))
            elif frames == 0 and container.duration:
                frames = int(round(container.duration / 1_000_000 * rate))
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
            rotation = 0
            for frame in container.decode(stream):  # the display matrix travels with the frames
                rotation = _right_angle(frame.rotation)
                break
            if rotation % 180:
                width, height = height, width
            return VideoInfo(path, frames, width, height, rate, rotation)
    except av.error.FFmpegError as err:
        raise DataError(f"{path}: not a readable video file, corrupt or truncated ({err})") from err


def _right_angle(degrees: float | None) -> int:
    return int(round((degrees or 0) / 90.0)) * 90 % 360


def read_frames(path: str | Path, check_length: bool = True) -> Iterator[np.ndarray]:
    """Yield each frame as uint8 `H x W x 3` RGB, upright, decoding one at a time.

    check_length: raise if the file ends before the frame count its header promises (a truncated
    download); the frames before that point have already been yielded.
    """
    for image, _ in timed_frames(path, check_length):
        yield image


def timed_frames(path: str | Path, check_length: bool = True) -> Iterator[tuple[np.ndarray, float | None]]:
    """(upright uint8 `H x W x 3` RGB frame, its presentation time in seconds or None), one at a time."""
    av = _av()
    info = probe(path)
    index = 0
    try:
        with av.open(str(info.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # FFmpeg's own threads: decoding keeps up with the network
            for frame in container.decode(stream):
                image = frame.to_ndarray(format="rgb24")
                if info.rotation:  # np.rot90 turns counterclockwise, as the display matrix does
                    image = np.ascontiguousarray(np.rot90(image, k=info.rotation // 90))
                yield image, (float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else None)
                index += 1
    except av.error.FFmpegError as err:
        raise DataError(f"{info.path}: cannot decode frame {index} ({err}); the file is corrupt or truncated") from err
    if index == 0:
        raise DataError(f"{info.path}: no frame could be decoded; the file is corrupt or empty")
    exact = info.path.suffix.lower() in (".mp4", ".m4v", ".mov")
    if check_length and exact and info.frames and index < info.frames:
        raise DataError(f"{info.path}: truncated: decoded {index} of the {info.frames} frames its header lists")


def check_complete(path: str | Path) -> VideoInfo:
    """The header, after reading every packet (no decoding: a fraction of the decode's time): a file
    that ends before the frame count (MP4/MOV) or the duration (MKV, WebM, ...) its header promises
    is a DataError ("truncated") before any frame is segmented."""
    av = _av()
    info = probe(path)
    packets, end = 0, 0.0
    try:
        with av.open(str(info.path)) as container:
            stream = container.streams.video[0]
            duration = float(container.duration / 1_000_000) if container.duration else 0.0
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                packets += 1
                if packet.pts is not None and packet.time_base:
                    end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
    except av.error.FFmpegError as err:
        raise DataError(f"{info.path}: truncated or corrupt: reading packet {packets} failed ({err})") from err
    exact = info.path.suffix.lower() in (".mp4", ".m4v", ".mov")
    if exact and info.frames and packets < info.frames:
        raise DataError(f"{info.path}: truncated: {packets} of the {info.frames} frames its header lists are in the file")
    if not exact and duration > 1.0 and end and end < 0.9 * duration - 0.5:
        raise DataError(f"{info.path}: truncated: its frames end at {end:.1f} s of the {duration:.1f} s its header lists")
    return info


class VideoWriter:
    """Encode RGB frames (uint8 `H x W x 3`, all one size) into a video file, one at a time.

    Odd sizes are padded by one pixel (the YUV 4:2:0 encoders need even sizes). Use as a context
    manager; the file is complete when it closes."""

    def __init__(self, path: str | Path, fps: float = 25.0, crf: int = 23):
        self.path = Path(path)
        self.fps = fps
        self.crf = crf
        # PyAV objects (av.container.OutputContainer, its video stream), set on the first frame;
        # `av` is imported lazily by _av(), so they are typed loosely
        self._container: Any = None
        self._stream: Any = None
        self._last = -1  # pts of the last frame written (TIME_BASE units); the first default is 0

    def _open(self, height: int, width: int) -> None:
        av = _av()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mp4 = self.path.suffix.lower() in (".mp4", ".m4v", ".mov")
        # faststart: the index goes first, so players (and browsers) start before the file is all there
        self._container = av.open(str(self.path), mode="w", options={"movflags": "faststart"} if mp4 else {})
        rate = Fraction(self.fps).limit_denominator(1001)
        codecs = [c for c in ("libx264", "h264", "mpeg4") if c in av.codecs_available]
        if not codecs:
            raise DataError(f"{self.path}: this FFmpeg build has no H.264 or MPEG-4 encoder")
        self._stream = self._container.add_stream(codecs[0], rate=rate)
        self._stream.codec_context.time_base = TIME_BASE  # fine enough for the source's own frame times
        self._stream.width, self._stream.height = width + width % 2, height + height % 2
        self._stream.pix_fmt = "yuv420p"
        if codecs[0] == "libx264":
            self._stream.options = {"crf": str(self.crf), "preset": "veryfast"}
        else:
            self._stream.bit_rate = 4_000_000

    def write(self, image: np.ndarray, time_s: float | None = None) -> None:  # image: H x W x 3 uint8
        """Encode one frame; `time_s` its presentation time (default: the next at `fps`)."""
        av = _av()
        h, w = image.shape[:2]
        if self._container is None:
            self._open(h, w)
        if (h + h % 2, w + w % 2) != (self._stream.height, self._stream.width):
            raise ValueError(f"{self.path}: frame is {w}x{h}, the video is {self._stream.width}x{self._stream.height}")
        if h % 2 or w % 2:
            image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image, dtype=np.uint8), format="rgb24")
        period = max(1, round(1 / (self.fps * TIME_BASE)))
        pts = round(time_s / TIME_BASE) if time_s is not None else (self._last + period if self._last >= 0 else 0)
        frame.pts, frame.time_base = max(pts, self._last + 1, 0), TIME_BASE  # times must increase
        self._last = frame.pts
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        if self._container is None:
            return
        for packet in self._stream.encode():  # flush the encoder's delayed frames
            self._container.mux(packet)
        self._container.close()
        self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | Path, frames, fps: float = 25.0) -> int:
    """Encode an iterable of RGB frames; -> frames written."""
    n = 0
    with VideoWriter(path, fps) as writer:
        for image in frames:
            writer.write(image)
            n += 1
    return n
