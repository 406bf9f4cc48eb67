"""The training-time unroll and losses, framework-free (the Ray trainer only scales them).

STM (sec. 3.5): memorise frame 1 with its ground truth, segment frame 2, memorise its *soft*
prediction (dynamic memory, no thresholding), segment frame 3, and so on; the loss covers every
frame after the first. Multi-object clips are segmented jointly through soft aggregation.

STRMN (Nguyen & Li, sec. 3.4.2): the same loop over a K-slot recurrent memory whose Fusion Cell
is trained through the memory updates, with truncated backpropagation through time
(`strmn_segments` / `unroll_strmn`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F

from stm_core.memory.recurrent import STRMN_RULES, Slots, update_slots
from stm_core.model.network import STMNetwork
from stm_core.model.read import label_shares, to_tokens


class UnrollOutput(NamedTuple):
    logits: torch.Tensor  # B x (N-1) x (1+O) x H x W, for frames 1..N-1
    loss: torch.Tensor  # scalar


def one_hot_objects(masks: torch.Tensor, num_objects: int) -> torch.Tensor:
    """masks: B x H x W ids in 0..O -> B x O x H x W float (object 1 in channel 0)."""
    return F.one_hot(masks.long(), num_objects + 1).permute(0, 3, 1, 2)[:, 1:].float()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits: B x (1+O) x H x W, target: B x H x W."""
    return F.cross_entropy(logits.float(), target.long())


def bootstrapped_cross_entropy(logits: torch.Tensor, target: torch.Tensor, top_p: float = 0.15) -> torch.Tensor:
    """Mean cross-entropy of the hardest `top_p` share of pixels (as in STCN / XMem)."""
    raw = F.cross_entropy(logits.float(), target.long(), reduction="none").flatten()
    k = max(1, int(raw.numel() * top_p))
    return raw.topk(k, sorted=False).values.mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "ce", top_p: float = 0.15):
    if kind == "ce":
        return cross_entropy(logits, target)
    if kind == "bootstrap":
        return bootstrapped_cross_entropy(logits, target, top_p)
    raise ValueError(f"unknown loss {kind!r}; choose 'ce' or 'bootstrap'")


def unroll_stm(
    network: STMNetwork,
    frames: torch.Tensor,  # B x N x 3 x H x W in [0, 1]
    masks: torch.Tensor,  # B x N x H x W ids in 0..O (O = max objects in the batch)
    valid: torch.Tensor,  # B x O bool: which object channels exist in each clip
    loss: str = "ce",
    top_p: float = 0.15,
    read_weight: float = 0.0,  # weight of `read_loss` (0: off, as in the paper)
) -> UnrollOutput:
    b, n, _, h, w = frames.shape
    num_objects = valid.shape[1]
    probs = one_hot_objects(masks[:, 0], num_objects) * valid[:, :, None, None]
    memory = network.encode_memory(frames[:, 0], probs)
    keys, values = [to_tokens(memory.key)], [to_tokens(memory.value)]  # B x O x hw x C each
    all_logits, losses, read_losses = [], [], []
    for t in range(1, n):
        query = network.encode_query(frames[:, t])
        logits = network.segment(query, torch.cat(keys, 2), torch.cat(values, 2), (h, w), valid)
        all_logits.append(logits)
        losses.append(segmentation_loss(logits, masks[:, t], loss, top_p))
        if read_weight > 0:
            read_losses.append(read_loss(query.key, torch.cat(keys, 2), masks[:, t], masks[:, :t], valid))
        if t < n - 1:  # memorise the soft prediction: no thresholding, gradients flow through it
            probs = logits.softmax(dim=1)[:, 1:]
            memory = network.encode_memory(frames[:, t], probs)
            keys.append(to_tokens(memory.key))
            values.append(to_tokens(memory.value))
    total = torch.stack(losses).mean()
    if read_losses:
        total = total + read_weight * torch.stack(read_losses).mean()
    return UnrollOutput(torch.stack(all_logits, 1), total)


def read_loss(
    query_key: torch.Tensor,  # B x Ck x h x w
    memory_key: torch.Tensor,  # B x O x L x Ck, L = T*h*w (frame-major, as the unroll stacks them)
    query_mask: torch.Tensor,  # B x H x W ids in 0..O: the query frame's ground truth
    memory_masks: torch.Tensor,  # B x T x H x W ids: the memory frames' ground truth
    valid: torch.Tensor,  # B x O bool
) -> torch.Tensor:  # scalar
    """Supervise the read itself: -log of the read weight (eq. 1-2, STM's 1/sqrt(Ck) scale) that a
    query location puts on memory locations of its own label (background or an object).

    Not in either paper. From scratch, at the embedded default's scale, the segmentation loss alone
    trains a read that ignores where the target is (an attention sink: `stm_core.read_probe`); this
    term makes the memory's content reach the decoder (docs/findings.md).
    """
    num_labels = valid.shape[1] + 1
    size = (query_key.shape[-2], query_key.shape[-1])  # h, w of the keys
    q_labels = label_shares(query_mask, num_labels, size)  # B x hw x labels
    m_labels = label_shares(memory_masks, num_labels, size).flatten(1, 2)  # B x L x labels, frame-major
    agree = q_labels @ m_labels.transpose(1, 2)  # B x hw x L: chance that both have one label
    q = to_tokens(query_key).float()  # B x hw x Ck
    weights = (torch.einsum("bqc,bolc->boql", q, memory_key.float()) / q.shape[-1] ** 0.5).softmax(-1)
    on_label = (weights * agree[:, None]).sum(-1)  # B x O x hw
    counted = (agree.sum(-1) > 0)[:, None] & valid[:, :, None]  # a label the memory has; a real object
    if not bool(counted.any()):
        return on_label.sum() * 0.0  # nothing to supervise; keeps the graph
    return -on_label.clamp_min(1e-6).log()[counted.expand_as(on_label)].mean()


class SegmentOutput(NamedTuple):
    start: int  # first frame index of the segment (frame 0 is memory only: never predicted)
    stop: int  # one past its last frame
    logits: torch.Tensor  # B x S x (1+O) x H x W for the segment's predicted frames
    loss: torch.Tensor  # scalar: mean over those frames, with the segment's graph


def strmn_segment_count(n_frames: int, segment_length: int) -> int:
    """How many segments `strmn_segments` yields for a clip of `n_frames` (those that predict a frame)."""
    return sum(1 for start in range(0, n_frames, segment_length)
               if max(start, 1) < min(start + segment_length, n_frames))


def strmn_segments(
    network: STMNetwork,
    frames: torch.Tensor,  # B x N x 3 x H x W in [0, 1]
    masks: torch.Tensor,  # B x N x H x W ids in 0..O
    valid: torch.Tensor,  # B x O bool
    rule: str = "C",  # A | B | C | D | I2M (the memory update, see stm_core.memory.recurrent)
    slots: int = 5,  # K
    segment_length: int = 10,  # T frames per TBPTT segment (the paper: 10 of 50)
    loss: str = "ce",
    top_p: float = 0.15,
) -> Iterator[SegmentOutput]:
    """The STRMN unroll, one TBPTT segment at a time.

    Frames [0, T), [T, 2T), ... form the segments. Within a segment gradients flow through the
    soft-prediction memory encodings and the memory updates (the Fusion Cell learns); between
    segments the memory is carried without gradient. Call `segment.loss.backward()` (and step)
    before asking for the next segment, or accumulate: segments share no graph.
    A clip of N <= T frames (5-frame pretraining clips) is one segment.
    """
    fusion = network.fusion
    if fusion is None:
        raise ValueError("unroll_strmn needs an STRMN network: ModelConfig(kind='strmn')")
    if rule not in STRMN_RULES:
        raise ValueError(f"unknown STRMN update rule {rule!r}; choose one of {STRMN_RULES}")
    if segment_length < 1 or slots < (2 if rule == "I2M" else 3):
        raise ValueError(f"need segment_length >= 1 and enough slots for rule {rule}, got {segment_length}, {slots}")
    b, n, _, h, w = frames.shape
    num_objects = valid.shape[1]

    def memorise(frame: torch.Tensor, probs: torch.Tensor, memory: Slots | None) -> Slots:
        encoded = network.encode_memory(frame, probs)
        new = Slots.first(encoded.feature, encoded.key, encoded.value)
        if memory is None:
            return new
        return update_slots(memory, new, slots, rule, fusion, network.template_key_value)

    probs = one_hot_objects(masks[:, 0], num_objects) * valid[:, :, None, None]
    memory = memorise(frames[:, 0], probs, None)
    for start in range(0, n, segment_length):
        stop = min(start + segment_length, n)
        all_logits, losses = [], []
        for t in range(max(start, 1), stop):
            query = network.encode_query(frames[:, t])
            keys, values = memory.tokens()
            logits = network.segment(query, keys, values, (h, w), valid)
            all_logits.append(logits)
            losses.append(segmentation_loss(logits, masks[:, t], loss, top_p))
            if t < n - 1:
                # The segment's last update is carried detached: building its graph is waste.
                with torch.no_grad() if t == stop - 1 else nullcontext():
                    memory = memorise(frames[:, t], logits.softmax(dim=1)[:, 1:], memory)
        memory = memory.detach()
        if all_logits:
            yield SegmentOutput(start, stop, torch.stack(all_logits, 1), torch.stack(losses).mean())


def unroll_strmn(
    network: STMNetwork,
    frames: torch.Tensor,  # B x N x 3 x H x W in [0, 1]
    masks: torch.Tensor,  # B x N x H x W ids in 0..O
    valid: torch.Tensor,  # B x O bool
    rule: str = "C",
    slots: int = 5,
    segment_length: int = 10,
    loss: str = "ce",
    top_p: float = 0.15,
    optimizer_step: Callable[[torch.Tensor], None] | None = None,
) -> UnrollOutput:
    """Truncated BPTT over a whole clip; `UnrollOutput.loss` is the mean over predicted frames.

    optimizer_step=None: nothing is stepped; `loss` carries every segment's graph (cut at the
    segment boundaries), so `out.loss.backward(); optimizer.step()` trains exactly like
    `unroll_stm` (use it for 5-frame pretraining clips: one segment).
    optimizer_step=fn: `fn(segment_loss)` is called after each segment, e.g.
    `lambda l: (opt.zero_grad(), l.backward(), opt.step())`: an update per segment, as in the
    paper's 50-frame / 10-frame-segment fine-tuning. The returned logits and loss are detached.
    """
    all_logits: list[torch.Tensor] = []  # B x S x (1+O) x H x W per segment
    total: float | torch.Tensor = 0.0  # sum of segment losses weighted by their frames
    count = 0
    for segment in strmn_segments(network, frames, masks, valid, rule, slots, segment_length, loss, top_p):
        frames_in = segment.logits.shape[1]
        if optimizer_step is not None:
            optimizer_step(segment.loss)
            segment = segment._replace(logits=segment.logits.detach(), loss=segment.loss.detach())
        all_logits.append(segment.logits)
        total = total + segment.loss * frames_in
        count += frames_in
    if count == 0:
        raise ValueError("unroll_strmn needs clips of at least 2 frames")
    assert isinstance(total, torch.Tensor)  # count > 0: at least one segment's loss was added
    return UnrollOutput(torch.cat(all_logits, 1), total / count)
