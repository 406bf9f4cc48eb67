"""One training step of a rank: the module DDP wraps, the learning rate, mixed precision, and the
forward / backward / update of a clip batch (STM, and STRMN's truncated BPTT segments).

Every forward goes through the prepared (DDP) module, so DDP's own reducer averages the gradients
over ranks, bucketed and overlapped with backward. STRMN's segments share no graph: each is its own
forward + backward through DDP; segments that only accumulate gradients for a later update run
under `no_sync`, so the ranks exchange gradients once per update.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from typing import Literal, cast

import numpy as np
import torch
from torch import nn

from pipeline.train.loop_config import LoopConfig
from pipeline.train.settings import StageParams, StrmnParams
from stm_core.model.network import ModelConfig, STMNetwork
from stm_core.training import SegmentOutput, UnrollOutput, strmn_segment_count, strmn_segments, unroll_stm


class Unroll(nn.Module):
    """DDP wraps this: forward = one training unroll of `network` over a batch of clips, or (with
    `segments`) the next STRMN TBPTT segment of an unroll in progress."""

    def __init__(self, network: STMNetwork, train: StageParams, strmn: StrmnParams):
        super().__init__()
        self.network, self.settings, self.strmn = network, train, strmn

    def forward(self, frames: torch.Tensor | None = None, masks: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, segments: Iterator[SegmentOutput] | None = None):
        if segments is not None:  # the segment's whole graph is built in this call: DDP sees it
            return next(segments)
        assert frames is not None and masks is not None and valid is not None, \
            "Unroll.forward needs frames, masks and valid, or segments"
        loss, top_p = self.settings.loss, self.settings.bootstrap_top_p
        if self.network.config.kind == "strmn":
            from stm_core.training import unroll_strmn

            return unroll_strmn(self.network, frames, masks, valid, rule=self.strmn.rule, slots=self.strmn.slots,
                                segment_length=self.strmn.segment_length, loss=loss, top_p=top_p)
        return unroll_stm(self.network, frames, masks, valid, read_weight=self.settings.read_loss, loss=loss,
                          top_p=top_p)

    def segments(self, frames: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> Iterator[SegmentOutput]:
        """frames B x N x 3 x H x W, masks B x N x H x W, valid B x O -> the clip's TBPTT segments, lazily."""
        return strmn_segments(self.network, frames, masks, valid, rule=self.strmn.rule, slots=self.strmn.slots,
                              segment_length=self.strmn.segment_length, loss=self.settings.loss,
                              top_p=self.settings.bootstrap_top_p)


def lr_at(step: int, train: StageParams) -> float:
    """Linear warm-up, then constant (the paper) or cosine decay to 10%."""
    base, warm, total = train.lr, train.warmup_steps, train.steps
    if warm > 0 and step < warm:
        return base * (step + 1) / warm
    if train.lr_schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return base * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress))))
    return base


def precision(choice: Literal["auto", "fp32", "bf16", "fp16"],
              device: torch.device) -> tuple[torch.dtype | None, bool]:
    """A stage's `precision` -> (autocast dtype or None, use GradScaler). auto: bf16 on GPUs that
    have it, fp16 on older GPUs, fp32 on CPU (bf16 autocast is slower than fp32 on small CPUs)."""
    if choice == "auto":
        if device.type != "cuda":
            return None, False
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}[choice]


def build_network(config: LoopConfig) -> STMNetwork:
    init = config.init
    if init is not None:  # main training: the pretrained weights, shipped through the object store
        import ray

        payload = ray.get(init) if isinstance(init, ray.ObjectRef) else init
        network = STMNetwork(ModelConfig(**{**payload["model_config"], "pretrained": "none"}))
        network.load_state_dict(payload["state_dict"])
        return network
    return STMNetwork(config.model)


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def make_train_step(model: nn.Module, network: STMNetwork, optimizer, scaler, autocast, tp: StageParams,
                    strmn: StrmnParams):
    """-> step(frames, masks, valid) -> UnrollOutput: forward(s), backward(s) and optimizer update(s).

    `model` is the prepared module (DDP over `Unroll` with several ranks, `Unroll` itself in one).
    STM: one forward of the whole unroll, one update. STRMN, strmn.update = segment: an update after
    every TBPTT segment (the paper's fine-tuning). STRMN, update = clip: one update per clip batch;
    under DDP every segment is its own forward + backward (its loss weighted by its share of the
    predicted frames), all but the last under no_sync; in one process the whole unroll is one
    forward and one backward, as before.
    """
    kind = network.config.kind
    per_segment = kind == "strmn" and strmn.update == "segment"
    accumulate = kind == "strmn" and not per_segment and is_ddp(model)
    unroll = cast(Unroll, model.module if is_ddp(model) else model)  # DDP wraps the Unroll

    def backward(loss: torch.Tensor) -> None:
        with torch.autocast(loss.device.type, enabled=False):  # backward outside autocast
            scaler.scale(loss).backward()

    def update() -> None:
        if tp.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(network.parameters(), tp.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def segmented(frames: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> UnrollOutput:
        n = frames.shape[1]
        count, predicted = strmn_segment_count(n, strmn.segment_length), n - 1
        segments = unroll.segments(frames, masks, valid)
        logits, total = [], torch.zeros((), device=frames.device)
        for i in range(count):
            last = i == count - 1
            sync = per_segment or last or not is_ddp(model)
            # not sync implies DDP (is_ddp above)
            with (nullcontext() if sync else cast(nn.parallel.DistributedDataParallel, model).no_sync()):
                with autocast:
                    seg = model(segments=segments)
                share = seg.logits.shape[1] / predicted
                backward(seg.loss if per_segment else seg.loss * share)
            if per_segment or last:
                update()
            logits.append(seg.logits.detach())
            total = total + seg.loss.detach() * share
        return UnrollOutput(torch.cat(logits, 1), total)

    def step(frames: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> UnrollOutput:
        if per_segment or accumulate:
            return segmented(frames, masks, valid)
        with autocast:
            out = model(frames, masks, valid)
        backward(out.loss)
        update()
        return out

    return step
