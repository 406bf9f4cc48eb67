"""The stateless STM network: one method per step (encode query, encode memory, read, decode).

All mutable state (memory, object ids, frame counter) lives in `stm_core.memory` and
`stm_core.inference`; the training unroll lives in `stm_core.training`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from stm_core.model.aggregate import soft_aggregate
from stm_core.model.decoder import Decoder, RowSplit
from stm_core.model.encoders import (
    BACKBONE_CHANNELS,
    KeyValue,
    MemoryEncoder,
    QueryEncoder,
    QueryFeatures,
    others_probability,
)
from stm_core.model.fast_path import fold_batchnorm_, fold_into, stem_maxpools_, winograd_convs_
from stm_core.model.read import memory_read, to_tokens

STRIDE = 16  # res4 is at 1/16 of the input


@dataclass
class ModelConfig:
    kind: Literal["stm", "strmn"] = "stm"  # stm: growing frame memory; strmn: K slots + Fusion Cell
    backbone: str = "resnet18"  # resnet50 is the paper's; resnet18 is the small CPU default
    pretrained: str = "none"  # imagenet | none | path to a backbone state dict
    norm: Literal["frozen_bn", "group"] = "group"  # frozen BatchNorm (STM) or GroupNorm (STRMN; trains from scratch)
    decoder_dim: int = 64  # channels of the refinement decoder (256 in the paper)
    top_k: int | None = None  # read only the k most similar memory locations (None: all, as STM)
    fusion_dim: int = 64  # hidden channels of the Fusion Cell's small CNNs f, g, h (STRMN)
    fusion_scale: Literal["sqrt", "none"] = "sqrt"  # Fusion Cell attention scale: 1/sqrt(C) | none (eq. 3)
    similarity: Literal["templates", "keys"] = "templates"  # STRMN rules C/D compare res4 templates | read keys

    def __post_init__(self):
        if self.backbone not in BACKBONE_CHANNELS:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {sorted(BACKBONE_CHANNELS)}")
        if self.kind not in ("stm", "strmn"):
            raise ValueError(f"unknown model kind {self.kind!r}; choose 'stm' or 'strmn'")

    @property
    def channels(self) -> int:  # C: res4 width
        return BACKBONE_CHANNELS[self.backbone][0]

    @property
    def key_dim(self) -> int:  # C/8: 128 for ResNet-50
        return self.channels // 8

    @property
    def value_dim(self) -> int:  # C/2: 512 for ResNet-50
        return self.channels // 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class MemoryFeatures(NamedTuple):
    feature: torch.Tensor  # B x O x C x h x w: res4 of the memory encoder (STRMN's template)
    key: torch.Tensor  # B x O x Ck x h x w
    value: torch.Tensor  # B x O x Cv x h x w


class STMNetwork(nn.Module):
    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()
        c4, c3, c2 = BACKBONE_CHANNELS[config.backbone]
        self.query_encoder = QueryEncoder(config.backbone, config.pretrained, config.norm)
        self.memory_encoder = MemoryEncoder(config.backbone, config.pretrained, config.norm)
        self.query_kv = KeyValue(c4, config.key_dim, config.value_dim)
        self.memory_kv = KeyValue(c4, config.key_dim, config.value_dim)
        self.decoder = Decoder(2 * config.value_dim, c3, c2, config.decoder_dim)
        self.fusion: nn.Module | None = None
        self.inference_only = False  # True for `fused_for_inference` copies
        if config.kind == "strmn":
            from stm_core.model.fusion import FusionCell

            self.fusion = FusionCell(c4, config.fusion_dim, scale=1.0 if config.fusion_scale == "none" else None,
                                     similarity=config.similarity)

    def fused_for_inference(self, channels_last: bool = False) -> STMNetwork:
        """An inference-only copy: frozen BatchNorm folded into the convolutions; on CPU, 3x3 stride-1
        convs by Winograd (NNPACK) and the stems' max-pools as separable maxima, or every weight
        channels-last (`channels_last`, for GPUs).

        Computes what this network computes up to float rounding (fp32: ~1e-5 relative). It has no
        BatchNorm parameters (a different state dict): run it, never train or save it; `self` is unchanged.
        """
        fused = copy.deepcopy(self).eval().requires_grad_(False)
        encoder = fused.memory_encoder
        if isinstance(encoder.stem_rest[0], FrozenBatchNorm2d):  # bn(conv1 + conv1_mask + conv1_others)
            fold_into([encoder.conv1, encoder.conv1_mask, encoder.conv1_others], encoder.stem_rest[0])
            encoder.stem_rest[0] = nn.Identity()
        fold_batchnorm_(fused)
        fused.inference_only = True
        if channels_last:
            return fused.to(memory_format=torch.channels_last)
        winograd_convs_(fused)
        stem_maxpools_(fused)  # PyTorch's NCHW CPU max-pool is the slow one
        return fused

    def encode_query(self, frames: torch.Tensor) -> QueryFeatures:
        """frames: B x 3 x H x W in [0, 1]; encoded once per frame, shared by all objects."""
        r4, r3, r2 = self.query_encoder(frames)
        key, value = self.query_kv(r4)
        return QueryFeatures(key, value, (r3, r2))

    def encode_query_with_skip_features(
        self, frames: torch.Tensor, beside: Callable[..., Future] | None = None
    ) -> tuple[QueryFeatures, tuple[torch.Tensor, torch.Tensor]]:
        """encode_query(frames) and decoder.skip_features(*skips): all the frame's own work.

        `beside(fn, *args) -> Future`, if given, runs the res3 skip path elsewhere (another thread,
        after a memory encoding there) while this one goes on with res4, the key and value, and
        the res2 skip path: with one object that balances the two threads best.
        """
        enc = self.query_encoder
        r2 = enc.res2(enc.stem(enc.normalize(frames)))
        r3 = enc.res3(r2)
        pending: Future[torch.Tensor] | None = None
        if beside is not None:
            pending = beside(self.decoder.refine3.skip, r3)
        else:
            s3 = self.decoder.refine3.skip(r3)
        r4 = enc.res4(r3)
        key, value = self.query_kv(r4)
        s2 = self.decoder.refine2.skip(r2)
        if pending is not None:
            s3 = pending.result()
        return QueryFeatures(key, value, (r3, r2)), (s3, s2)

    def encode_memory(
        self,
        frames: torch.Tensor,  # B x 3 x H x W
        probs: torch.Tensor,  # B x O x H x W: P(object) of the objects to encode
        others: torch.Tensor | None = None,  # B x O x H x W: P(any other object); default from probs
    ) -> MemoryFeatures:
        b, o = probs.shape[:2]
        others = others_probability(probs) if others is None else others
        feature = self.memory_encoder(frames, probs, others)  # one backbone pass per object, as in STM
        key, value = self.memory_kv(feature)
        return MemoryFeatures(*(x.unflatten(0, (b, o)) for x in (feature, key, value)))

    def template_key_value(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """... x C x h x w memory template -> (key, value): how STRMN slots become readable memory."""
        lead = feature.shape[:-3]
        key, value = self.memory_kv(feature.flatten(0, -4) if lead else feature[None])
        return key.reshape(*lead, *key.shape[1:]), value.reshape(*lead, *value.shape[1:])

    def read(
        self,
        query: QueryFeatures,
        memory_key: torch.Tensor,  # B x O x L x Ck, L = T*h*w memory locations
        memory_value: torch.Tensor,  # B x O x L x Cv
    ) -> torch.Tensor:  # B x O x 2Cv x h x w: [query value, read value] per object
        b, o = memory_key.shape[:2]
        h, w = query.key.shape[-2:]
        q = to_tokens(query.key).repeat_interleave(o, dim=0)  # (B*O) x hw x Ck
        read = memory_read(q, memory_key.flatten(0, 1), memory_value.flatten(0, 1), top_k=self.config.top_k)
        read = read.transpose(1, 2).reshape(b, o, -1, h, w)
        value = query.value[:, None].expand(-1, o, -1, -1, -1).to(read.dtype)
        return torch.cat([value, read], dim=2)

    def decode(
        self,
        readout: torch.Tensor,
        skips: tuple[torch.Tensor, torch.Tensor],  # the query's (res3, res2)
        out_size: tuple[int, int],
        skip_features: tuple[torch.Tensor, torch.Tensor] | None = None,  # decoder.skip_features(*skips), if run
        split: RowSplit | None = None,  # CPU inference: the decoder's merges in row bands on two threads
    ) -> torch.Tensor:  # B x O x H x W foreground logits, each object on its own
        b, o = readout.shape[:2]
        logits = self.decoder(readout.flatten(0, 1), *skips, out_size, skip_features, split)  # (B*O) x 1 x H x W
        return logits[:, 0].unflatten(0, (b, o))

    def aggregate(self, foreground: torch.Tensor) -> torch.Tensor:
        """B x O x H x W per-object foreground probabilities -> B x (1+O) x H x W probabilities,
        soft-aggregated once (what inference returns and memorises)."""
        return soft_aggregate(foreground).softmax(dim=1)

    def segment(
        self,
        query: QueryFeatures,
        memory_key: torch.Tensor,
        memory_value: torch.Tensor,
        out_size: tuple[int, int],
        valid: torch.Tensor | None = None,  # B x O bool, False for padded objects
    ) -> torch.Tensor:  # B x (1+O) x H x W aggregated logits; softmax -> probabilities
        fg = self.decode(self.read(query, memory_key, memory_value), query.skips, out_size)
        return soft_aggregate(torch.sigmoid(fg.float()), valid)
