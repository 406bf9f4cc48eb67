"""One `stm segment` worker (a Ray actor of pipeline.workpool): loads the checkpoint once, then
segments whole videos one at a time, streaming their frames, and publishes each video's folder.

The per-frame loop is `stm_core.inference.segment_video`'s (the single-video form), kept here so
the worker can also read the memory's size and the process's memory as the video goes.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from pipeline.segment.outputs import Output, draw_overlay, palette_array
from pipeline.segment.sources import VideoJob, frame_names, load_given, measure, stream_frames
from pipeline.segment.tree import Inputs
from stm_core.data.io import DataError, index_mask_png
from stm_core.inference import InferenceCore, memory_bytes, memory_entries, probabilities_to_mask
from stm_core.process_memory import peak_rss_bytes, release_free_heap, reset_peak_rss, rss_bytes
from stm_core.runtimes import load_network

REPORT_EVERY = 10  # frames between progress reports to the driver
RSS_EVERY = 250  # frames between resident-memory samples in the video's record
CHECK_MEMORY_EVERY = 25  # frames between checks of the memory's size against the warning limit


@dataclass
class Settings:
    """What makes a video's outputs what they are: a re-run skips a video only when its record holds
    the same key() (and the same input fingerprint; pipeline.segment.outputs.why_redo)."""

    checkpoint: str
    checkpoint_sha256: str
    memory: str
    precision: str
    max_size: int | None
    device: str
    timed_kernels: bool = False
    resolution: str = ""  # DAVIS resolution folder ("" for video files)
    overlay: bool = False  # OUT/<video>.mp4 is part of the video's output
    runtime: str = "torch"  # torch | onnx (stm_core.runtimes.load_network)
    onnx: str | None = None  # --onnx: graphs of `stm export` (None: exported from the checkpoint)

    def key(self) -> dict:
        return {k: v for k, v in asdict(self).items()
                if k not in ("checkpoint", "device", "onnx") and (k, v) != ("runtime", "torch")}


class SegmentWorker:
    """A pool actor. `checkpoint` is the checkpoint's bytes (one object-store copy for all actors)."""

    def __init__(self, checkpoint: bytes, settings: Settings, out: str, threads: int = 1,
                 overlay: bool = False, warn_memory_mb: float = 2048.0, progress=None):
        torch.set_num_threads(max(1, threads))
        from stm_core.model.fast_path import set_winograd_mode

        # As the single-video form: the same CPU convolution kernels every run unless asked to time them.
        set_winograd_mode("auto" if settings.timed_kernels else "off")
        self.settings, self.out, self.overlay = settings, Output(out), overlay or settings.overlay
        self.warn_bytes = warn_memory_mb * 2**20
        self.progress = progress
        self.device = torch.device(settings.device)
        self.network = _load(checkpoint, self.device, settings.runtime, settings.onnx)

    def _report(self, key: str, units: int) -> None:
        if self.progress is not None and units:
            self.progress.add.remote(key, units)

    def run(self, job: VideoJob) -> dict:
        """Segment one video and publish its folder; -> its record. Raises DataError naming the file."""
        local = Inputs(job.root)  # a store file is fetched when read, into this process's bounded cache
        size = measure(job, local)
        given, palette = load_given(job, local, size)
        if self.settings.max_size and max(size) > self.settings.max_size:  # said once per video: masks stay full size
            scale = self.settings.max_size / max(size)
            print(f"stm segment: {job.name}: {size[1]}x{size[0]} frames are segmented at "
                  f"{round(size[1] * scale)}x{round(size[0] * scale)} (--max-size {self.settings.max_size}); masks are "
                  f"written at {size[1]}x{size[0]}", file=sys.stderr, flush=True)
        colours = palette_array(palette)
        staged = self.out.staging(job.name)
        overlay_file = self.out.overlay_path(job.name, staged) if self.overlay else None
        writer = None
        try:
            if overlay_file is not None:
                from stm_core.data.video_file import VideoWriter

                writer = VideoWriter(overlay_file, fps=job.fps)
            record = self._segment(job, local, size, given, palette, colours, staged, writer)
            if writer is not None:
                writer.close()
            self.out.commit(job.name, staged, record, overlay_file)
            return record
        except BaseException:
            if writer is not None:
                try:
                    writer.close()
                except Exception:  # noqa: BLE001 - the original error is the one to report
                    pass
            shutil.rmtree(staged, ignore_errors=True)
            if overlay_file is not None:
                overlay_file.unlink(missing_ok=True)
            raise

    def _segment(self, job: VideoJob, local: Inputs, size: tuple[int, int], given: dict[int, torch.Tensor],
                 palette: list[int] | None, colours: np.ndarray, staged, writer) -> dict:
        s = self.settings
        release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()
        base_rss = rss_bytes()
        core = InferenceCore(self.network, s.memory, device=self.device, max_internal_size=s.max_size,
                             precision=s.precision)
        start = time.perf_counter()
        rss_mb: dict[str, float] = {}
        warnings: list[str] = []
        unreported = 0
        t = -1
        names = frame_names(job)
        try:
            for t, (frame, when) in enumerate(stream_frames(job, local)):  # frame: 3 x H x W in [0, 1]
                if tuple(frame.shape[-2:]) != size:
                    raise DataError(f"{job.source}: frame {t} is {frame.shape[-1]}x{frame.shape[-2]}, the first "
                                    f"frame {size[1]}x{size[0]} (W x H)")
                mask = given.get(t)
                probs = core.step(frame, mask)  # (1+O) x H x W
                ids = probabilities_to_mask(probs, core.object_ids).cpu()
                if mask is not None:  # annotated objects are exactly their annotation (as segment_video)
                    m = mask.to(torch.uint8)
                    annotated = m.unique()
                    ids = torch.where(torch.isin(ids, annotated[annotated > 0]), 0, ids)
                    ids = torch.where(m > 0, m, ids)
                ids_np = ids.numpy()
                (staged / f"{next(names)}.png").write_bytes(index_mask_png(ids_np, palette))
                if writer is not None:
                    image = (frame.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                    writer.write(draw_overlay(image, ids_np, colours), when)  # the source's own times
                unreported += 1
                if unreported >= REPORT_EVERY:
                    self._report(job.name, unreported)
                    unreported = 0
                if (t + 1) % RSS_EVERY == 0:
                    rss_mb[str(t + 1)] = round(rss_bytes() / 2**20, 1)
                if not warnings and (t + 1) % CHECK_MEMORY_EVERY == 0 and memory_bytes(core) > self.warn_bytes:
                    warnings.append(memory_warning(job.name, s.memory, memory_bytes(core), t + 1))
                    print(f"stm segment: warning: {warnings[-1]}", file=sys.stderr, flush=True)
            core.synchronize()
        finally:
            core.close()
            self._report(job.name, unreported)
        seconds = time.perf_counter() - start
        frames = t + 1
        if job.length and frames != job.length and not job.video:
            raise DataError(f"{job.source}: read {frames} of {job.length} frames")
        if self.device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated())
        else:
            peak = max(0, peak_rss_bytes() - base_rss)
        objects = sorted({int(i) for m in given.values() for i in m.unique().tolist() if i})
        return {"status": "done", "frames": frames, "objects": len(objects), "seconds": round(seconds, 3),
                "fps": round(frames / seconds, 2) if seconds > 0 else None,
                "memory_entries": memory_entries(core), "memory_mb": round(memory_bytes(core) / 2**20, 2),
                "peak_memory_mb": round(peak / 2**20, 1),
                "peak_memory_kind": "cuda_max_allocated" if self.device.type == "cuda" else "rss_growth",
                "rss_mb": rss_mb, "warnings": warnings, "source": job.source,
                "node": _node_id(), "worker_pid": os.getpid(), "settings": s.key(),
                "inputs": job.inputs}


def memory_warning(video: str, policy: str, nbytes: int, frames: int) -> str:
    return (f"{video}: the memory ({policy}) holds {nbytes / 2**20:.0f} MB after {frames} frames and grows with "
            "the video; a bounded policy keeps it flat: --memory fifo:8 (STM model) or --memory recurrent:5:C "
            "(STRMN model)")


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray
        return ""


def _load(data: bytes, device: torch.device, runtime: str = "torch", onnx: str | None = None):
    """The network from the checkpoint's bytes (torch reads them in memory: nothing on the node's disk)."""
    return load_network(runtime, data, device, onnx)
