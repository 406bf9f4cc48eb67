"""Streaming inference: one frame in, per-object probabilities out; all mutable state lives here.

Objects may appear mid-video (YouTube-VOS style): the objects an annotated frame introduces form a
new *group* with a memory of its own, starting at that frame. Every frame is encoded by the query
encoder once, shared by all groups. Frames arrive one at a time; the video is never on the device.

`precision` (`stm_core.precision`): "fp32" (the default) runs every operation in IEEE fp32, TF32
off, memory stored in fp32: what the official STM computes, and what results are reported in.
"bf16" runs under bf16 autocast (CUDA and CPU) and stores the memory in bf16, for speed.

On a CPU with two or more threads, independent work (one object's memory encoding beside the next
frame's query encoding, the decoder's merges in two row bands) runs on a second thread
(`stm_core.lane.Overlap`, `overlap`): the same operations on the same inputs, so the same result up
to rounding. `step` returns as soon as the frame's mask is known; the memory is brought up to date
before anything reads it (`synchronize`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from stm_core.lane import Overlap
from stm_core.memory import Encoded, Memory, make_memory
from stm_core.model.encoders import QueryFeatures
from stm_core.model.network import STRIDE, MemoryFeatures, ModelConfig, STMNetwork
from stm_core.precision import DTYPES, autocast, check_precision, exact_fp32


class StepNetwork(Protocol):
    """What InferenceCore and the memories call on a network: `STMNetwork` (torch) implements it, and
    so does `stm_core.onnx_runtime.OnnxNetwork` (the graphs of `stm export` on onnxruntime)."""

    config: ModelConfig
    fusion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None  # STRMN: x_i, x_j -> updated x_j

    def encode_query_with_skip_features(
        self, frames: torch.Tensor, beside: Any = None  # 1 x 3 x H x W
    ) -> tuple[QueryFeatures, tuple[torch.Tensor, torch.Tensor]]: ...

    def read(self, query: QueryFeatures, memory_key: torch.Tensor,  # 1 x O x L x Ck
             memory_value: torch.Tensor) -> torch.Tensor: ...  # 1 x O x L x Cv -> 1 x O x 2Cv x h x w

    def decode(self, readout: torch.Tensor, skips: tuple[torch.Tensor, torch.Tensor], out_size: tuple[int, int],
               skip_features: tuple[torch.Tensor, torch.Tensor] | None = None,
               split: Any = None) -> torch.Tensor: ...  # -> 1 x O x H x W logits

    def aggregate(self, foreground: torch.Tensor) -> torch.Tensor: ...  # 1 x O x H x W -> 1 x (1+O) x H x W

    def encode_memory(self, frames: torch.Tensor, probs: torch.Tensor,  # 1 x O x H x W
                      others: torch.Tensor) -> MemoryFeatures: ...

    def template_key_value(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


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
        network: STMNetwork | StepNetwork,  # torch, or another runtime's (stm_core.onnx_runtime.OnnxNetwork)
        memory: str = "every:5",  # memory policy: every:5, fifo:8, recurrent:5:C, ...
        device: str | torch.device | None = None,  # default: the network's
        max_internal_size: int | None = None,  # longest side the network sees; None: native
        precision: str = "fp32",  # "fp32": exact, TF32 off | "bf16": autocast, for speed (CUDA, CPU)
        fast: bool = True,  # run network.fused_for_inference(): BatchNorm folded, Winograd (CPU fp32)
        overlap: bool | None = None,  # CPU: a second thread for independent work (None: on for CPU)
    ):
        self.policy = memory
        make_memory(memory, network)  # fail now, not at the first frame, on a bad policy
        self.precision = check_precision(precision)
        self.memory_dtype = DTYPES[precision]  # what the memory stores: fp32 is never rounded
        self.network: STMNetwork | StepNetwork
        if not isinstance(network, STMNetwork):  # another runtime: runs as built, on its own threads
            if precision != "fp32":
                raise ValueError(f"precision {precision!r}: the {type(network).__name__} runtime serves fp32 only")
            self.device, self.channels_last, self.network = network.device, False, network  # type: ignore[attr-defined]
            fast, overlap = False, False
        else:
            self.device = torch.device(device) if device is not None else next(network.parameters()).device
            # The fused copy equals the network up to float rounding (fp32 ~1e-5); `network` stays as it is.
            # Channels-last on CUDA and for oneDNN's bf16 kernels; NNPACK's Winograd (CPU fp32) is NCHW.
            self.channels_last = fast and (self.device.type == "cuda" or precision == "bf16")
            self.network = (network.fused_for_inference(self.channels_last) if fast else network.eval()).to(self.device)
        self.max_internal_size = max_internal_size
        self._groups: list[_Group] = []
        self.frame_index = -1
        self.overlap = self.device.type == "cpu" if overlap is None else overlap
        self._lanes = Overlap(self.overlap, winograd=self.device.type == "cpu" and fast and not self.channels_last,
                              context=self._autocast)

    @property
    def groups(self) -> list[_Group]:
        """Object groups with their memories, up to date with every frame stepped so far."""
        self.synchronize()
        return self._groups

    def synchronize(self) -> None:
        """Wait for a memory encoding still running beside the caller (re-raises its error)."""
        self._lanes.synchronize()

    def close(self) -> None:
        self._lanes.close()

    @property
    def object_ids(self) -> list[int]:
        """Object ids in probability-channel order (channel k+1 is object_ids[k])."""
        return [i for g in self._groups for i in g.object_ids]

    def _autocast(self):
        return autocast(self.precision, self.device.type)

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
        if self.precision == "bf16":
            return self._step(frame, mask, objects, truth)
        with exact_fp32() as scope:
            probs = self._step(frame, mask, objects, truth)
            if scope.reduced_on_cpu:  # leaving lets oneDNN round fp32: the memory encoding ends first
                self.synchronize()
            return probs

    def _step(self, frame: torch.Tensor, mask: torch.Tensor | None, objects: Iterable[int] | None,
              truth: torch.Tensor | None) -> torch.Tensor:  # step's arguments -> (1+O) x H x W
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
        with self._lanes.beside_memory_encoding() as beside:
            query, skip_features = self.network.encode_query_with_skip_features(image, beside)
        fg = []
        for group in self.groups:  # synchronized: the previous frame is memorised
            split = self._lanes.decoder_split(len(group.object_ids))
            keys, values = group.memory.keys_values()
            logits = self.network.decode(self.network.read(query, keys[None], values[None]), query.skips,
                                         (image.shape[-2], image.shape[-1]), skip_features, split)
            fg.append(torch.sigmoid(unpad(logits, pad)[0].float()))
        probs = torch.cat(fg, 0)  # O x h x w, each object on its own
        # Soft aggregation makes the objects compete for each pixel before they are memorised.
        return self.network.aggregate(probs[None])[0]

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
        self._lanes.encode_memory(objects, self._encode_memory, image, padded, annotated, t)

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
                stored = Encoded(*(x[0].to(self.memory_dtype) for x in enc))  # feature, key, value
                group.memory.add(t, stored, annotated=_annotates(group, annotated))
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
    # max(dim).indices is argmax with the same tie rule (the first maximum), and 13x faster than
    # argmax(dim=0) on CPU for a 480p frame (7 vs 97 ms, one thread): argmax reduces the strided dim slowly.
    return lookup[probs.max(dim=0).indices]


def segment_video(
    network: STMNetwork | StepNetwork,
    frames: Iterable[torch.Tensor],  # each 3 x H x W, streamed
    masks: dict[int, torch.Tensor],  # frame index -> H x W ids (first frame, frames adding objects)
    memory: str = "every:5",
    device: str | torch.device | None = None,
    max_internal_size: int | None = None,
    precision: str = "fp32",  # fp32 | bf16 (see InferenceCore)
) -> Iterator[torch.Tensor]:
    """Yield an H x W uint8 id mask per frame (on CPU). Annotated frames yield their annotation."""
    core = InferenceCore(network, memory, device=device, max_internal_size=max_internal_size, precision=precision)
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


