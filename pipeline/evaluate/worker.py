"""One evaluation task: segment one sequence with one variant, time it, and score it.

Plain functions of bytes in, bytes and scores out (no Ray, no MLflow, no file writes), so a task
runs the same on this machine or on any node of a cluster: the frames, the annotations and the
checkpoint travel in the task's arguments, the predictions come back as palette-PNG bytes that
the driver writes. Prediction and scoring use the same decoded masks that the PNGs hold.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.evaluate.variants import COPY_FIRST, Variant
from stm_core.data.io import DataError, decode_image, decode_index_mask_png, index_mask_png, to_tensor
from stm_core.inference import InferenceCore, memory_entries, probabilities_to_mask
from stm_core.model.checkpoint import load_checkpoint
from stm_core.model.fast_path import set_winograd_mode
from stm_core.model.network import STMNetwork
from stm_core.postprocess import remove_far_blobs
from stm_core.process_memory import peak_rss_bytes, release_free_heap, reset_peak_rss, rss_bytes
from stm_core.read_probe import heatmap_picture, probe_sequence
from stm_core.scoring.masks import MetricError
from stm_core.scoring.sequences import SequenceScores, evaluate_sequence

SIZE_TOLERANCE = 2  # masks this many pixels off their frame's size are resized (as stm_core.data.video)


@dataclass
class SequencePayload:
    """Everything a task needs about one video, as encoded bytes (cheap to ship to a worker)."""

    name: str
    frame_names: list[str]  # file stems, in temporal order
    frames: list[bytes]  # encoded images (JPEG/PNG), one per frame
    annotations: dict[int, bytes]  # frame index -> ground-truth index-mask PNG bytes
    object_frames: dict[int, int] | None = None  # object id -> frame that introduces it (None: from masks)


@dataclass
class SequenceResult:
    variant: str
    name: str
    frame_names: list[str]  # file stems, in temporal order
    masks: list[bytes]  # predicted palette PNG per frame
    scores: SequenceScores  # per object and scored frame
    frames: int
    seconds: float  # segmentation time of all frames (decoding and scoring excluded)
    peak_memory_bytes: int  # CUDA max allocated, or the process's peak RSS growth during the video
    memory_entries: int  # frames or slots held at the end (largest object group)
    memory_bytes: int  # bytes of the keys and values the memory read attends to at the end
    node_id: str = ""  # the Ray node that ran it (empty outside Ray)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- model cache

class NetworkCache:
    """The networks one worker process holds, by (checkpoint sha256, top_k, device): each checkpoint is
    loaded once per process however many (variant, sequence) items the process runs."""

    def __init__(self) -> None:
        self.networks: dict[tuple[str, int | None, str], STMNetwork] = {}
        self.loads: dict[str, int] = {}  # checkpoint sha256 -> times loaded (for tests and logs)

    def get(self, digest: str, fetch, top_k: int | None, device: str) -> STMNetwork:
        """`fetch()` returns the checkpoint bytes on a miss. top_k: None keeps the checkpoint's
        setting, 0 reads all memory locations, k > 0 the k best."""
        key = (digest, top_k, device)
        if key not in self.networks:
            overrides = {} if top_k is None else {"top_k": top_k or None}
            # from the bytes: a checkpoint may be larger than the node's disk
            network = load_checkpoint(fetch(), map_location=device, **overrides).to(device)
            _warm_up(network, torch.device(device))
            self.networks[key] = network
            self.loads[digest] = self.loads.get(digest, 0) + 1
        return self.networks[key]


def _warm_up(network: STMNetwork, device: torch.device) -> None:
    """A few tiny frames through every part (the Fusion Cell too), so one-time lazy initialisation
    (kernels, thread pools, library pages) is not counted in the first sequence's time and memory."""
    policy = "recurrent:3:C" if getattr(network, "fusion", None) is not None else "first+previous"
    core = InferenceCore(network, policy, device=device)
    mask = torch.zeros(64, 64, dtype=torch.long)
    mask[16:48, 16:48] = 1
    for t in range(4):  # K = 3 slots fill at frame 2; frame 3 runs the Fusion Cell
        core.step(torch.rand(3, 64, 64), mask if t == 0 else None)


# ----------------------------------------------------------------------------- memory probes

class PeakMemory:
    """Peak memory of the work between start() and stop(): CUDA max allocated, else the process's
    RSS growth (approximate on CPU: allocator caching and fragmentation count too)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            release_free_heap()
            reset_peak_rss()
            self.base = rss_bytes()

    def stop(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        return max(0, peak_rss_bytes() - self.base)


# ----------------------------------------------------------------------------- the task

def decode_annotations(payload: SequencePayload, size: tuple[int, int]) -> dict[int, np.ndarray]:
    """Ground-truth id masks by frame index, resized (nearest) when a few pixels off the frame size."""
    out = {}
    for t, data in sorted(payload.annotations.items()):
        where = f"{payload.name}/{payload.frame_names[t]}.png"
        mask = decode_index_mask_png(data, where)
        if mask.shape != size:
            if max(abs(mask.shape[0] - size[0]), abs(mask.shape[1] - size[1])) > SIZE_TOLERANCE:
                raise DataError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but the frame is "
                                f"{size[1]}x{size[0]} (W x H)")
            mask = np.asarray(torch.nn.functional.interpolate(
                torch.from_numpy(mask)[None, None].float(), size=size, mode="nearest")[0, 0].to(torch.uint8))
        out[t] = mask
    return out


def given_masks(gt: dict[int, np.ndarray], object_frames: dict[int, int] | None) -> dict[int, np.ndarray]:
    """The semi-supervised input: at the frame that introduces objects, their masks only (others 0)."""
    if object_frames is None:
        object_frames = {}
        for t, mask in sorted(gt.items()):
            for obj in np.unique(mask).tolist():
                if obj not in (0, 255) and obj not in object_frames:
                    object_frames[obj] = t
    by_frame: dict[int, list[int]] = {}
    for obj, t in object_frames.items():
        by_frame.setdefault(t, []).append(obj)
    given = {}
    for t, objs in sorted(by_frame.items()):
        if t not in gt:
            raise DataError(f"object(s) {objs} are introduced at frame {t}, which has no annotation")
        given[t] = np.where(np.isin(gt[t], objs), gt[t], 0).astype(np.uint8)
    return given


def copy_first(n_frames: int, given: dict[int, np.ndarray], size: tuple[int, int]) -> list[np.ndarray]:
    """The baseline: each annotation carried forward unchanged; a newer annotation claims its pixels."""
    current = np.zeros(size, dtype=np.uint8)
    out = []
    for t in range(n_frames):
        if t in given:
            current = np.where(given[t] > 0, given[t], current).astype(np.uint8)
        out.append(current.copy())
    return out


def _segment(network: STMNetwork, variant: Variant, payload: SequencePayload, given: dict[int, np.ndarray],
             device: torch.device, max_size: int | None, gt: dict[int, np.ndarray] | None = None,
             precision: str = "fp32") -> tuple[list[np.ndarray], float, int, int, int]:
    """`gt` (oracle variants): frames the policy memorises hold their ground truth where it exists."""
    core = InferenceCore(network, variant.policy, device=device, max_internal_size=max_size, precision=precision)
    probe = PeakMemory(device)
    probe.start()
    seconds = 0.0
    out: list[np.ndarray] = []  # H x W uint8 object ids, one per frame
    for t, data in enumerate(payload.frames):
        frame = to_tensor(decode_image(data, f"{payload.name}/{payload.frame_names[t]}"))  # 3 x H x W
        mask = torch.from_numpy(given[t]).long() if t in given else None
        truth = torch.from_numpy(gt[t]).long() if variant.oracle and gt is not None and t in gt else None
        start = time.perf_counter()
        probs = core.step(frame, mask, truth=truth)
        pred = probabilities_to_mask(probs, core.object_ids).cpu().numpy()  # syncs the device
        seconds += time.perf_counter() - start
        if variant.postprocess and out and t not in given:  # STRMN's step: output only, memory untouched
            pred = remove_far_blobs(pred, out[-1])
        if t in given:  # the annotation is exact where it speaks (as stm_core.inference.segment_video)
            pred = np.where(given[t] > 0, given[t], pred).astype(np.uint8)
        out.append(pred)
    start = time.perf_counter()
    core.close()  # the last memory encoding may still run on the CPU side lane: it counts
    seconds += time.perf_counter() - start
    return out, seconds, probe.stop(), memory_entries(core), read_bytes(core)


def read_bytes(core: InferenceCore) -> int:
    """Bytes of the keys and values the next read would attend to, all object groups: the memory's
    size as the papers count it (frames x locations for STM, K slots for STRMN), not buffer capacity."""
    total = 0
    for group in core.groups:
        if group.memory.size:
            for t in group.memory.keys_values():
                total += t.numel() * t.element_size()
    return total


def score(payload: SequencePayload, gt: dict[int, np.ndarray], preds: list[np.ndarray]) -> SequenceScores:
    """J and F on the annotated frames (all of them for DAVIS), the first and last not scored."""
    scored = sorted(gt)
    if len(scored) < 3:
        raise MetricError(f"{payload.name}: only {len(scored)} annotated frame(s); scoring needs ground truth "
                          "on at least 3 frames (use a split with dense or periodic annotations)")
    return evaluate_sequence([gt[t] for t in scored], [preds[t] for t in scored], name=payload.name,
                             frame_names=[payload.frame_names[t] for t in scored])


def run_sequence(variant: Variant, network: STMNetwork | None, payload: SequencePayload,
                 device: str = "cpu", max_size: int | None = None, precision: str = "fp32") -> SequenceResult:
    """Segment, time and score one sequence. `network` is None for copy-first."""
    dev = torch.device(device)
    size = decode_image(payload.frames[0], f"{payload.name}/{payload.frame_names[0]}").shape[:2]
    gt = decode_annotations(payload, size)
    given = given_masks(gt, payload.object_frames)
    if not given:
        raise DataError(f"{payload.name}: no annotated object to start from")
    if variant.policy == COPY_FIRST:
        start = time.perf_counter()
        preds = copy_first(len(payload.frames), given, size)
        seconds, peak, entries, nbytes = time.perf_counter() - start, 0, 0, 0
    else:
        if network is None:
            raise ValueError(f"variant {variant.name} needs a network")
        preds, seconds, peak, entries, nbytes = _segment(network, variant, payload, given, dev, max_size, gt,
                                                             precision)
    pngs = [index_mask_png(p) for p in preds]
    # Score exactly what the PNGs hold (the encoding is lossless for uint8 ids).
    scores = score(payload, gt, [decode_index_mask_png(b) for b in pngs])
    return SequenceResult(variant=variant.name, name=payload.name, frame_names=list(payload.frame_names), masks=pngs, scores=scores,
                          frames=len(payload.frames), seconds=seconds, peak_memory_bytes=peak,
                          memory_entries=entries, memory_bytes=nbytes)


def probe_read(network: STMNetwork, payload: SequencePayload, every: int, picture: bool) -> dict:
    """Where the network's memory read looks on one sequence, against its ground truth
    (stm_core.read_probe): {"memories": {name: {"precision", "chance", "sink", "count"} sums},
    "picture": PNG bytes or None}. The picture: each target's read of its first frame, at the frame nearest
    the middle that shows the most targets."""
    size = decode_image(payload.frames[0], f"{payload.name}/{payload.frame_names[0]}").shape[:2]
    gt = decode_annotations(payload, size)
    frames = [to_tensor(decode_image(d, f"{payload.name}/{n}")) for d, n in zip(payload.frames, payload.frame_names)]
    # the picture's query frame: the one nearest the middle among those that show the most targets
    in_view = {t: len(set(np.unique(m).tolist()) - {0, 255}) for t, m in gt.items() if t > 0}
    most = max(in_view.values(), default=0)
    middle = min((t for t, n in in_view.items() if n == most), key=lambda t: abs(t - len(frames) // 2), default=0)
    totals, heat = probe_sequence(network, frames, {t: torch.from_numpy(m).long() for t, m in gt.items()},
                                  every, heatmap_frame=middle if picture and most else None)
    png = None
    if heat:
        from PIL import Image

        def image(t: int) -> np.ndarray:  # H x W x 3 uint8
            return (frames[t].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

        rows = [heatmap_picture(image(middle), gt[middle], image(first), gt[first], maps[first], obj)
                for obj, maps in sorted(heat.items())[:3] for first in maps]
        sheet = Image.fromarray(np.concatenate(rows, axis=0))
        if sheet.width < 512:  # small benchmark frames: twice the size, pixels kept sharp
            sheet = sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST)
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        png = buffer.getvalue()
    return {"memories": {name: vars(t) for name, t in totals.items()}, "picture": png,
            "picture_frame": payload.frame_names[middle] if png else None}


@dataclass
class EvaluationJob:
    """One item of the evaluation pool: a variant on a sequence, or (variant None) the read probe."""

    variant: Variant | None
    model: tuple[str, list] | None  # (sha256, [ObjectRef of the checkpoint bytes]), None for copy-first
    payload: SequencePayload
    every: int = 0  # the probe's memory interval


class EvaluationWorker:
    """A Ray actor: one per reserved device share (one per GPU by default), fed (variant, sequence)
    items one at a time. Models load once per actor, not once per task (Ray starts a fresh process
    for every GPU task), and a sequence is timed with the device to itself."""

    def __init__(self, device: str, max_size: int | None, top_k: int | None, threads: int,
                 reproducible: bool = True, precision: str = "fp32"):
        torch.set_num_threads(max(1, threads))
        # Timed kernel choices depend on the machine's load; chained policies turn their rounding
        # differences into different masks, so a reproducible evaluation fixes the kernels.
        set_winograd_mode("off" if reproducible else "auto")
        self.device, self.max_size, self.top_k, self.precision = device, max_size, top_k, precision
        self.cache = NetworkCache()

    def work(self, job: EvaluationJob) -> SequenceResult | dict:
        """The pool's entry point (pipeline.workpool)."""
        if job.variant is None:
            assert job.model is not None
            return self.probe(job.model, job.payload, job.every)
        return self.run(job.variant, job.model, job.payload)

    def run(self, variant: Variant, model: tuple[str, list] | None, payload: SequencePayload) -> SequenceResult:
        """`model` is (sha256, [ObjectRef of the checkpoint bytes]): the ref is wrapped in a list so
        Ray does not fetch the bytes when this actor already holds that network."""
        network = self._network(model) if model is not None else None
        result = run_sequence(variant, network, payload, self.device, self.max_size, self.precision)
        import ray

        result.node_id = ray.get_runtime_context().get_node_id()  # which node ran it (cluster tests, logs)
        return result

    def probe(self, model: tuple[str, list], payload: SequencePayload, every: int) -> dict:
        """probe_read, with its picture, on this actor's copy of the network (`model` as in run)."""
        return {"sequence": payload.name, **probe_read(self._network(model), payload, every, picture=True)}

    def _network(self, model: tuple[str, list]) -> STMNetwork:
        digest, box = model

        def fetch() -> bytes:
            import ray

            return ray.get(box[0])

        return self.cache.get(digest, fetch, self.top_k, self.device)

    def loads(self) -> dict[str, int]:
        return dict(self.cache.loads)
