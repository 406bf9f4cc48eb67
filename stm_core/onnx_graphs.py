"""The parts of one inference step as modules with tensor-only signatures, for `torch.onnx.export`.

Each wraps the network's own method (`STMNetwork.encode_query_with_skip_features`, `read`, `decode`,
`aggregate`, `encode_memory`, `template_key_value`, `fusion`), so the graphs compute what
`InferenceCore` computes with the torch network. Batch is 1 (one frame); the object count O, the
memory length L (frames x h x w, or slots x h x w) and the image size are dynamic axes. Sizes
are multiples of the stride (16): `InferenceCore` pads every frame before the network sees it.

GRAPHS lists, per graph: its inputs and outputs with their dynamic axes, and example inputs for
tracing (small, so an export takes seconds plus the backbone's weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from stm_core.model.encoders import QueryFeatures
from stm_core.model.network import STMNetwork

H, W = "height", "width"  # padded image size (multiples of 16)
FH, FW = "feature_height", "feature_width"  # res4 size, 1/16 of it


class QueryEncoderGraph(nn.Module):
    """image 1 x 3 x H x W in [0, 1] -> key 1 x Ck x h x w, value 1 x Cv x h x w, the decoder's
    skip features s3 1 x D x 2h x 2w and s2 1 x D x 4h x 4w (shared by all objects of the frame)."""

    def __init__(self, network: STMNetwork):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        query, (s3, s2) = self.network.encode_query_with_skip_features(image)
        return query.key, query.value, s3, s2


class ReadGraph(nn.Module):
    """query key/value 1 x C x h x w, memory key 1 x O x L x Ck, value 1 x O x L x Cv
    -> readout 1 x O x 2Cv x h x w ([query value, read value] per object)."""

    def __init__(self, network: STMNetwork):
        super().__init__()
        self.network = network

    def forward(self, query_key, query_value, memory_key, memory_value) -> torch.Tensor:
        skips = (query_key, query_key)  # the read takes no skips: placeholders
        return self.network.read(QueryFeatures(query_key, query_value, skips), memory_key, memory_value)


class DecoderGraph(nn.Module):
    """readout 1 x O x 2Cv x h x w, s3, s2 -> logits 1 x O x H x W (H = 4 x s2's height: the
    padded image, as `InferenceCore` decodes it)."""

    def __init__(self, network: STMNetwork):
        super().__init__()
        self.network = network

    def forward(self, readout, s3, s2) -> torch.Tensor:
        size = (s2.shape[-2] * 4, s2.shape[-1] * 4)
        return self.network.decode(readout, (s3, s2), size, (s3, s2))


class AggregateGraph(nn.Module):
    """foreground 1 x O x H x W (sigmoid of each object's logits) -> probabilities 1 x (1+O) x H x W."""

    def __init__(self, network: STMNetwork):
        super().__init__()
        self.network = network

    def forward(self, foreground) -> torch.Tensor:
        return self.network.aggregate(foreground)


class MemoryEncoderGraph(nn.Module):
    """image 1 x 3 x H x W, probs / others 1 x O x H x W -> feature, key, value 1 x O x C x h x w."""

    def __init__(self, network: STMNetwork):
        super().__init__()
        self.network = network

    def forward(self, image, probs, others) -> tuple[torch.Tensor, ...]:
        return tuple(self.network.encode_memory(image, probs, others))


class TemplateKeyValueGraph(nn.Module):
    """STRMN: fused templates N x C x h x w -> their read key N x Ck x h x w and value N x Cv x h x w."""

    def __init__(self, network: STMNetwork):
        super().__init__()
        self.network = network

    def forward(self, feature) -> tuple[torch.Tensor, torch.Tensor]:
        return self.network.template_key_value(feature)


class FusionGraph(nn.Module):
    """STRMN's Fusion Cell: x_i (leaving), x_j (kept) N x C x h x w -> the updated x_j."""

    def __init__(self, network: STMNetwork):
        super().__init__()
        assert network.fusion is not None, "FusionGraph of a network without a Fusion Cell"
        self.fusion = network.fusion

    def forward(self, x_i, x_j) -> torch.Tensor:
        return self.fusion(x_i, x_j)


@dataclass(frozen=True)
class GraphSpec:
    module: Callable[[STMNetwork], nn.Module]
    inputs: dict[str, dict[int, str]]  # name -> dynamic axes
    outputs: dict[str, dict[int, str]]
    example: Callable[[STMNetwork], tuple[torch.Tensor, ...]]  # tracing inputs
    strmn_only: bool = False


def _image(net: STMNetwork) -> torch.Tensor:
    return torch.rand(1, 3, 64, 96)


def _fmap(net: STMNetwork, channels: int, n: int = 1, scale: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, 4 * scale, 6 * scale)


def _decoder_dim(net: STMNetwork) -> int:
    return net.config.decoder_dim


FEATURE = {2: FH, 3: FW}
PER_OBJECT = {1: "objects", 3: FH, 4: FW}
GRAPHS: dict[str, GraphSpec] = {
    "query_encoder": GraphSpec(
        QueryEncoderGraph, {"image": {2: H, 3: W}},
        {"key": FEATURE, "value": FEATURE, "s3": {2: "s3_height", 3: "s3_width"},
         "s2": {2: "s2_height", 3: "s2_width"}},
        lambda n: (_image(n),)),
    "memory_encoder": GraphSpec(
        MemoryEncoderGraph, {"image": {2: H, 3: W}, "probs": {1: "objects", 2: H, 3: W},
                             "others": {1: "objects", 2: H, 3: W}},
        {"feature": PER_OBJECT, "key": PER_OBJECT, "value": PER_OBJECT},
        lambda n: (_image(n), torch.rand(1, 2, 64, 96), torch.rand(1, 2, 64, 96))),
    "read": GraphSpec(
        ReadGraph, {"query_key": FEATURE, "query_value": FEATURE,
                    "memory_key": {1: "objects", 2: "locations"}, "memory_value": {1: "objects", 2: "locations"}},
        {"readout": PER_OBJECT},
        lambda n: (_fmap(n, n.config.key_dim), _fmap(n, n.config.value_dim),
                   torch.randn(1, 2, 48, n.config.key_dim), torch.randn(1, 2, 48, n.config.value_dim))),
    "decoder": GraphSpec(
        DecoderGraph, {"readout": {1: "objects", 3: FH, 4: FW}, "s3": {2: "s3_height", 3: "s3_width"},
                       "s2": {2: "s2_height", 3: "s2_width"}},
        {"logits": {1: "objects", 2: H, 3: W}},
        lambda n: (torch.randn(1, 2, 2 * n.config.value_dim, 4, 6), _fmap(n, _decoder_dim(n), scale=2),
                   _fmap(n, _decoder_dim(n), scale=4))),
    "aggregate": GraphSpec(
        AggregateGraph, {"foreground": {1: "objects", 2: H, 3: W}}, {"probs": {1: "channels", 2: H, 3: W}},
        lambda n: (torch.rand(1, 2, 64, 96),)),
    "template_key_value": GraphSpec(
        TemplateKeyValueGraph, {"feature": {0: "templates", 2: FH, 3: FW}},
        {"key": {0: "templates", 2: FH, 3: FW}, "value": {0: "templates", 2: FH, 3: FW}},
        lambda n: (_fmap(n, n.config.channels, n=2),), strmn_only=True),
    "fusion": GraphSpec(
        FusionGraph, {"x_i": {0: "templates", 2: FH, 3: FW}, "x_j": {0: "templates", 2: FH, 3: FW}},
        {"fused": {0: "templates", 2: FH, 3: FW}},
        lambda n: (_fmap(n, n.config.channels, n=2), _fmap(n, n.config.channels, n=2)), strmn_only=True),
}


def graph_names(kind: str) -> list[str]:
    """The graphs a model of `kind` ('stm' | 'strmn') exports."""
    return [name for name, spec in GRAPHS.items() if kind == "strmn" or not spec.strmn_only]
