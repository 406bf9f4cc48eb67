"""Streaming inference: one frame in, per-object probabilities out; all mutable state lives here.

Objects may appear mid-video (YouTube-VOS style): the objects an annotated frame introduces form a
new *group* with a memory of its own, starting at that frame. Every frame is encoded by the query
encoder once, shared by all groups. Frames arrive one at a time; the video is never on the device.

On a CPU with two or more threads, a second thread (`stm_core.lane.SideLane`, `overlap`) takes
work that shares no input with the caller's, each with half the threads:
- one object's memory encoding of frame t runs beside frame t+1's query encoding (the query side
  needs only the new frame, the memory side only the previous frame and its mask); the memory read
  waits for both. With more objects the memory side (one encoder pass per object) outweighs the
  query side, and it runs with all threads instead;
- one object's decoder merge blocks (3x3 convs at 1/8 and 1/4 scale, NNPACK's Winograd, which
  does not scale past one thread here) run in two row bands, one per thread.
Same operations on the same inputs, so the same result up to rounding. `step` returns as soon as
the frame's mask is known; the memory is brought up to date before anything reads it
(`synchronize`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from stm_core.lane import SideLane
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
        overlap: bool | None = None,  # CPU: a second thread for independent work (None: on for CPU)
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
        self._lane: SideLane | None = None  # made at the first frame that uses it (with 2+ threads)
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
        if self._lane is not None:
            self._lane.synchronize()

    def close(self) -> None:
        if self._lane is not None:
            self._lane.close()
            self._lane = None

    def _lane_for(self, threads: int) -> SideLane | None:
        """The side lane, made (or remade for a new thread count) if overlap is on and threads >= 2."""
        if not self.overlap or threads < 2:
            return None
        if self._lane is None or self._lane.threads != threads:
            self.close()
            self._lane = SideLane(threads)
        return self._lane

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
        truth: torch.Tensor | None = None,  # H x W ground-truth ids: memorised instead of the prediction
    ) -> torch.Tensor:  # (1+O) x H x W probabilities, channel 0 background, then self.object_ids
        """Segment one frame and memorise it. Annotated frames return their annotation.

        `truth` (oracle memory, a diagnostic): if the policy memorises this frame, it memorises the
        ground truth of the tracked objects (one-hot) instead of the prediction, which is still what
        is returned. The gap to the same policy without it is what the model's own mistakes cost.
        """
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
        memorised = probs if truth is None else self._one_hot(truth, size)
        with self._autocast():
            self._memorize(image, memorised[1:], pad, annotated)
        if size == (height, width):
            return probs
        return F.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)[0]

    def _predict(self, image: torch.Tensor, pad) -> torch.Tensor | None:
        """-> (1+O) x h x w: each object decoded on its own, then soft-aggregated once."""
        if not self._groups:  # groups are born with their annotation, so each has a memory
            return None
        # Everything that needs only this frame, beside the previous frame's memory encoding.
        lane = self._lane
        if lane is not None and lane.busy:
            with lane.sharing():
                query, skip_features = self.network.encode_query_with_skip_features(image, lane.submit)
        else:
            query, skip_features = self.network.encode_query_with_skip_features(image)
        fg = []
        for group in self.groups:  # synchronized: the previous frame is memorised
            # One object: its merge convs in two row bands. Several: one band of O images already
            # keeps NNPACK busy, and the split measured no faster (3 objects: 0.96x).
            lane = self._lane_for(torch.get_num_threads()) if len(group.object_ids) == 1 else None
            split = lane.rows_in_two if lane is not None else None
            keys, values = group.memory.keys_values()
            logits = self.network.decode(self.network.read(query, keys[None], values[None]), query.skips,
                                         image.shape[-2:], skip_features, split)
            fg.append(torch.sigmoid(unpad(logits, pad)[0].float()))
        probs = torch.cat(fg, 0)  # O x h x w, each object on its own
        # Soft aggregation makes the objects compete for each pixel before they are memorised.
        return soft_aggregate(probs[None])[0].softmax(dim=0)

    def _apply_annotation(self, probs, mask: torch.Tensor, size, annotated: set[int]) -> torch.Tensor:
        """Ground truth overrides prediction for annotated objects; others yield their pixels.

        probs: (1+O_known) x h x w or None -> (1+O) x h x w; an annotated pixel is exactly its
        object (one-hot, as the official code memorises the first frame's mask).
        """
        mask = _resize_ids(mask, size)
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

    def _one_hot(self, truth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """H x W ground-truth ids -> (1+O) x h x w one-hot over self.object_ids (ids not tracked yet
        are background)."""
        truth = _resize_ids(truth.to(self.device).long(), size)
        ids = torch.tensor([0, *self.object_ids], device=self.device)
        out = (truth[None] == ids[:, None, None]).float()
        out[0] = 1 - out[1:].sum(0)  # untracked ids -> background
        return out

    def _memorize(self, image: torch.Tensor, probs: torch.Tensor, pad, annotated: set[int]) -> None:
        self.synchronize()  # memories are updated in frame order
        t = self.frame_index
        # Pad the probabilities like the image so memory features line up with query features.
        padded = F.pad(probs, pad) if any(pad) else probs.clone()  # O x Hp x Wp; the caller gets probs
        padded = F.interpolate(padded[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0] \
            if padded.shape[-2:] != image.shape[-2:] else padded
        objects = sum(len(g.object_ids) for g in self._groups if _wants_encoding(g, t, annotated))
        if objects == 0:
            return  # no memory encoding this frame (e.g. `first`): the next query gets all threads
        # One memory-encoder pass per object: beside the query encoder (one pass), one object
        # balances the two threads; more would leave the query side waiting with half the cores.
        lane = self._lane_for(torch.get_num_threads()) if objects == 1 else None
        if lane is None:
            self._encode_memory(image, padded, annotated, t)
        else:
            lane.submit(self._encode_memory, image, padded, annotated, t)

    def _encode_memory(self, image: torch.Tensor, padded: torch.Tensor, annotated: set[int], t: int) -> None:
        """Memory-encode frame t (padded: O x Hp x Wp probabilities) for the groups that want it."""
        total = padded.sum(0, keepdim=True)
        start = 0
        for group in self._groups:
            n = len(group.object_ids)
            if _wants_encoding(group, t, annotated):
                p = padded[start : start + n]
                others = (total - p).clamp(0, 1)
                enc = self.network.encode_memory(image, p[None], others[None])
                group.memory.add(t, Encoded(enc.feature[0], enc.key[0], enc.value[0]),
                                 annotated=_annotates(group, annotated))
            start += n


def _resize_ids(ids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """H x W object ids -> size (nearest: ids are labels, not intensities)."""
    if ids.shape[-2:] == size:
        return ids
    return F.interpolate(ids[None, None].float(), size=size, mode="nearest")[0, 0].long()


def _annotates(group: _Group, annotated: set[int]) -> bool:
    return any(i in annotated for i in group.object_ids)


def _wants_encoding(group: _Group, t: int, annotated: set[int]) -> bool:
    """Whether frame t is memory-encoded for `group`: its first frame, an annotation, or its policy."""
    return group.memory.size == 0 or _annotates(group, annotated) or group.memory.wants(t)


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


