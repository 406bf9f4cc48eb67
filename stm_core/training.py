"""The training-time unroll and losses, framework-free (the Ray trainer only scales them).

STM (sec. 3.5): memorise frame 1 with its ground truth, segment frame 2, memorise its *soft*
prediction (dynamic memory, no thresholding), segment frame 3, and so on; the loss covers every
frame after the first. Multi-object clips are segmented jointly through soft aggregation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from stm_core.model.network import STMNetwork
from stm_core.model.read import to_tokens


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
) -> UnrollOutput:
    b, n, _, h, w = frames.shape
    num_objects = valid.shape[1]
    probs = one_hot_objects(masks[:, 0], num_objects) * valid[:, :, None, None]
    memory = network.encode_memory(frames[:, 0], probs)
    keys, values = [to_tokens(memory.key)], [to_tokens(memory.value)]  # B x O x hw x C each
    all_logits, losses = [], []
    for t in range(1, n):
        query = network.encode_query(frames[:, t])
        logits = network.segment(query, torch.cat(keys, 2), torch.cat(values, 2), (h, w), valid)
        all_logits.append(logits)
        losses.append(segmentation_loss(logits, masks[:, t], loss, top_p))
        if t < n - 1:  # memorise the soft prediction: no thresholding, gradients flow through it
            probs = logits.softmax(dim=1)[:, 1:]
            memory = network.encode_memory(frames[:, t], probs)
            keys.append(to_tokens(memory.key))
            values.append(to_tokens(memory.value))
    return UnrollOutput(torch.stack(all_logits, 1), torch.stack(losses).mean())
