"""Streaming inference: one frame in, per-object probabilities out; all mutable state lives here.

Objects may appear mid-video (YouTube-VOS style): the objects an annotated frame introduces form a
new *group* with a memory of its own, starting at that frame. Every frame is encoded by the query
encoder once, shared by all groups. Frames arrive one at a time; the video is never on the device.

On a CPU with two or more threads, a frame's memory encoding runs beside the next frame's query
encoding (`overlap`): the two encoders share no input (the query side needs only the new frame, the
memory side only the previous frame and its mask), each gets half the threads, and the memory read
waits for both. Same operations on the same inputs, so the same result; only the order of work
changes. `step` returns as soon as the frame's mask is known; the memory is brought up to date
before anything reads it (`synchronize`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F

from stm_core.memory import Encoded, Memory, make_memory
from stm_core.model.aggregate import soft_aggregate
from stm_core.model.fuse import claim_nnpack_threads
from stm_core.model.network import STRIDE, STMNetwork


def pad_to_stride(x: torch.Tensor, stride: int = STRIDE) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad the last two dims to multiples of `stride` with zeros, split around the image
    (floor(d/2) before, the rest after), exactly as the official STM code does."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % stride, (-w) % stride
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)  # left, right, top, bottom
    if ph == 0 and pw == 0:
        return x, pad
    return F.pad(x, pad), pad


def unpad(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    left, right, top, bottom = pad
    return x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]


class _Group:
    def __init__(self, object_ids: list[int], memory: Memory):
        self.object_ids = object_ids
        self.memory = memory


class InferenceCore:
    def __init__(
        self,
        network: STMNetwork,
        memory: str = "every:5",
        device: str | torch.device | None = None,
        max_internal_size: int | None = None,  # longest side the network sees; None: native
        amp: bool = True,  # bf16 autocast on CUDA (ignored on CPU)
        fast: bool = True,  # run network.fused_for_inference(): BatchNorm folded, Winograd (CPU)
        overlap: bool | None = None,  # CPU: memory encoding beside the next query encoding (None: on for CPU)
    ):
        self.policy = memory
        make_memory(memory, network)  # fail now, not at the first frame, on a bad policy
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        # The fused copy equals the network up to float rounding (fp32 ~1e-5); `network` stays as it is.
        self.channels_last = fast and self.device.type == "cuda"  # NNPACK's Winograd is CPU-only, NCHW
        self.network = (network.fused_for_inference(self.channels_last) if fast else network.eval()).to(self.device)
        self.max_internal_size = max_internal_size
        self.amp = amp and self.device.type == "cuda"
        self._groups: list[_Group] = []
        self.frame_index = -1
        self.overlap = self.device.type == "cpu" if overlap is None else overlap
        self._lane: ThreadPoolExecutor | None = None  # one thread: memory encodings, in frame order
        self._pending: list[Future] = []  # work queued on the lane (the last frame's memory encoding)
        if self.overlap and self.device.type == "cpu" and fast:
            threads = torch.get_num_threads()
            claim_nnpack_threads(threads - threads // 2)  # a lane's share: no oversubscribed cores

    @property
    def groups(self) -> list[_Group]:
        """Object groups with their memories, up to date with every frame stepped so far."""
        self.synchronize()
        return self._groups

    def synchronize(self) -> None:
        """Wait for a memory encoding still running beside the caller (re-raises its error)."""
        pending, self._pending = self._pending, []
        for future in pending:  # in queue order: the first error is raised
            future.result()

    def close(self) -> None:
        self.synchronize()
        if self._lane is not None:
            self._lane.shutdown()
            self._lane = None

    def __del__(self):
        lane = getattr(self, "_lane", None)
        if lane is not None:
            lane.shutdown(wait=False)

    @property
    def object_ids(self) -> list[int]:
        """Object ids in probability-channel order (channel k+1 is object_ids[k])."""
        return [i for g in self._groups for i in g.object_ids]

    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _internal_size(self, h: int, w: int) -> tuple[int, int]:
        if self.max_internal_size is None or max(h, w) <= self.max_internal_size:
            return h, w
        s = self.max_internal_size / max(h, w)
        return max(1, round(h * s)), max(1, round(w * s))

    @torch.inference_mode()
    def step(
        self,
        frame: torch.Tensor,  # 3 x H x W, float in [0, 1] or uint8
        mask: torch.Tensor | None = None,  # H x W object ids (0 = background)
        objects: Iterable[int] | None = None,  # ids the mask annotates; default: all its non-zero ids
    ) -> torch.Tensor:  # (1+O) x H x W probabilities, channel 0 background, then self.object_ids
        """Segment one frame and memorise it. Annotated frames return their annotation."""
        self.frame_index += 1
        frame = frame.to(self.device, non_blocking=True)
        frame = frame.float() / 255 if frame.dtype == torch.uint8 else frame.float()
        height, width = frame.shape[-2:]
        size = self._internal_size(height, width)
        image = F.interpolate(frame[None], size=size, mode="bilinear", align_corners=False) if size != (
            height, width) else frame[None]
        image, pad = pad_to_stride(image)
        if self.channels_last:  # the fused network's weights are channels-last: so are its inputs
            image = image.contiguous(memory_format=torch.channels_last)

        with self._autocast():
            probs = self._predict(image, pad)  # (1+O) x h x w at internal size, or None

        annotated: set[int] = set()
        if mask is not None:
            mask = mask.to(self.device).long()
            annotated = set(int(i) for i in (objects if objects is not None else mask.unique().tolist()) if i != 0)
            known = set(self.object_ids)
            new_ids = sorted(annotated - known)
            if new_ids:
                self.synchronize()
                self._groups.append(_Group(new_ids, make_memory(self.policy, self.network)))
            if annotated:
                probs = self._apply_annotation(probs, mask, size, annotated)

        if probs is None:  # nothing to track yet
            return torch.ones(1, height, width, device=self.device)

        # The same probabilities are memorised and returned: aggregated once, as the official STM.
        with self._autocast():
            self._memorize(image, probs[1:], pad, annotated)
        if size == (height, width):
            return probs
        return F.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)[0]

    def _predict(self, image: torch.Tensor, pad) -> torch.Tensor | None:
        """-> (1+O) x h x w: each object decoded on its own, then soft-aggregated once."""
        if not self._groups:  # groups are born with their annotation, so each has a memory
            return None
        # Everything that needs only this frame, beside the previous frame's memory encoding.
        with self._beside_memorize() as beside:
            query, skip_features = self.network.encode_query_with_skip_features(image, beside)
        fg = []
        for group in self.groups:  # synchronized: the previous frame is memorised
            keys, values = group.memory.keys_values()
            logits = self.network.decode(self.network.read(query, keys[None], values[None]), query.skips,
                                         image.shape[-2:], skip_features)
            fg.append(torch.sigmoid(unpad(logits, pad)[0].float()))
        probs = torch.cat(fg, 0)  # O x h x w, each object on its own
        # Soft aggregation makes the objects compete for each pixel before they are memorised.
        return soft_aggregate(probs[None])[0].softmax(dim=0)

    def _apply_annotation(self, probs, mask: torch.Tensor, size, annotated: set[int]) -> torch.Tensor:
        """Ground truth overrides prediction for annotated objects; others yield their pixels.

        probs: (1+O_known) x h x w or None -> (1+O) x h x w; an annotated pixel is exactly its
        object (one-hot, as the official code memorises the first frame's mask).
        """
        if mask.shape[-2:] != size:
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        ids = self.object_ids
        out = torch.zeros(1 + len(ids), *size, device=self.device)
        if probs is not None:
            out[: probs.shape[0]] = probs
        else:
            out[0] = 1
        claimed = torch.zeros(size, dtype=torch.bool, device=self.device)
        for obj in ids:
            if obj in annotated:
                claimed |= mask == obj
        out[0] *= ~claimed
        for k, obj in enumerate(ids, start=1):
            out[k] = (mask == obj).float() if obj in annotated else out[k] * (~claimed)
        return out

    @contextlib.contextmanager
    def _beside_memorize(self):
        """Run the body with half the threads while a memory encoding runs with the other half, then
        wait for it; with nothing running, the body gets all threads."""
        threads = torch.get_num_threads()
        if not self._pending or threads < 2:
            yield None
            self.synchronize()
            return
        torch.set_num_threads(threads - threads // 2)
        try:
            yield self._beside
        finally:
            torch.set_num_threads(threads)
            self.synchronize()

    def _beside(self, fn, *args) -> Future:
        """Queue fn(*args) on the memory lane, after the memory encoding running there."""
        self._pending.append(self._lane.submit(self._in_lane, fn, *args))
        return self._pending[-1]

    def _memorize(self, image: torch.Tensor, probs: torch.Tensor, pad, annotated: set[int]) -> None:
        self.synchronize()  # memories are updated in frame order
        t = self.frame_index
        # Pad the probabilities like the image so memory features line up with query features.
        padded = F.pad(probs, pad) if any(pad) else probs.clone()  # O x Hp x Wp; the caller gets probs
        padded = F.interpolate(padded[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0] \
            if padded.shape[-2:] != image.shape[-2:] else padded
        if not any(g.memory.size == 0 or g.memory.wants(t) or any(i in annotated for i in g.object_ids)
                   for g in self._groups):
            return  # no memory encoding this frame (e.g. `first`): the next query gets all threads
        threads = torch.get_num_threads()
        if not self.overlap or threads < 2:
            self._encode_memory(image, padded, annotated, t)
            return
        if self._lane is None:
            self._lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stm-memorize")
        self._lane_threads = threads // 2
        self._pending.append(self._lane.submit(self._in_lane, self._encode_memory, image, padded, annotated, t))

    def _in_lane(self, fn, *args):
        torch.get_num_threads()  # this thread's first call reads the process-wide count: take it first,
        torch.set_num_threads(self._lane_threads)  # then set its own (OpenMP's count is per thread)
        with torch.inference_mode():  # thread-local, like the thread count
            return fn(*args)

    def _encode_memory(self, image: torch.Tensor, padded: torch.Tensor, annotated: set[int], t: int) -> None:
        """Memory-encode frame t (padded: O x Hp x Wp probabilities) for the groups that want it."""
        total = padded.sum(0, keepdim=True)
        start = 0
        for group in self._groups:
            n = len(group.object_ids)
            group_annotated = any(i in annotated for i in group.object_ids)
            if group.memory.size == 0 or group_annotated or group.memory.wants(t):
                p = padded[start : start + n]
                others = (total - p).clamp(0, 1)
                enc = self.network.encode_memory(image, p[None], others[None])
                group.memory.add(t, Encoded(enc.feature[0], enc.key[0], enc.value[0]), annotated=group_annotated)
            start += n


def probabilities_to_mask(probs: torch.Tensor, object_ids: list[int]) -> torch.Tensor:
    """(1+O) x H x W -> H x W object ids (uint8), background where no object wins."""
    lookup = torch.tensor([0, *object_ids], dtype=torch.uint8, device=probs.device)
    return lookup[probs.argmax(dim=0)]


def segment_video(
    network: STMNetwork,
    frames: Iterable[torch.Tensor],  # each 3 x H x W, streamed
    masks: dict[int, torch.Tensor],  # frame index -> H x W ids (first frame, frames adding objects)
    memory: str = "every:5",
    device: str | torch.device | None = None,
    max_internal_size: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield an H x W uint8 id mask per frame (on CPU). Annotated frames yield their annotation."""
    core = InferenceCore(network, memory, device=device, max_internal_size=max_internal_size)
    for t, frame in enumerate(frames):
        given = masks.get(t)
        probs = core.step(frame, given)
        out = probabilities_to_mask(probs, core.object_ids).cpu()
        if given is not None:  # annotated objects are exactly their annotation; others keep predictions
            given = given.to(out.device).to(torch.uint8)
            annotated = given.unique()
            out = torch.where(torch.isin(out, annotated[annotated > 0]), 0, out)
            out = torch.where(given > 0, given, out)
        yield out


def memory_entries(core: InferenceCore) -> int:
    """Memory entries of the largest group (frames or slots): the benchmark's `memory_entries`."""
    return max((g.memory.size for g in core.groups), default=0)


def memory_bytes(core: InferenceCore) -> int:
    return sum(g.memory.nbytes for g in core.groups)


