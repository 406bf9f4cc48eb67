"""Query and memory encoders: ResNet to res4, then key (C/8) and value (C/2) by parallel 3x3 convs."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torchvision import models
from torchvision.ops import FrozenBatchNorm2d

# res4 / res3 / res2 channel widths of each backbone.
BACKBONE_CHANNELS: dict[str, tuple[int, int, int]] = {
    "resnet18": (256, 128, 64),
    "resnet34": (256, 128, 64),
    "resnet50": (1024, 512, 256),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_resnet(name: str, pretrained: str, norm: str) -> models.ResNet:
    """torchvision ResNet with frozen BatchNorm (the paper) or GroupNorm (STRMN's small batches).

    `pretrained`: "imagenet" (torchvision weights API; needs internet or a warm cache), "none",
    or a path to a state dict file.
    """
    if name not in BACKBONE_CHANNELS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONE_CHANNELS)}")
    if norm == "frozen_bn":
        norm_layer = FrozenBatchNorm2d
    elif norm == "group":
        norm_layer = lambda channels: nn.GroupNorm(min(32, channels // 4), channels)  # noqa: E731
    else:
        raise ValueError(f"unknown norm {norm!r}; choose 'frozen_bn' or 'group'")
    net = getattr(models, name)(weights=None, norm_layer=norm_layer)
    if pretrained == "none":
        return net
    if pretrained == "imagenet":
        weights = models.get_weight(f"{_weights_enum(name)}.IMAGENET1K_V1")
        try:
            state = weights.get_state_dict(progress=True)
        except Exception as err:  # noqa: BLE001 - any network failure gets the same advice
            raise RuntimeError(
                f"could not fetch ImageNet weights for {name} ({err}); on an offline machine set "
                "model.pretrained: none, or a path to a downloaded state dict"
            ) from err
    else:
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
    # GroupNorm has no running statistics: load what matches, loudly if nothing does.
    missing, unexpected = net.load_state_dict(state, strict=False)
    if len(missing) > len(state) // 2:
        raise RuntimeError(f"{pretrained}: does not look like {name} weights ({len(missing)} keys missing)")
    return net


def _weights_enum(name: str) -> str:
    return {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights"}[name]


class KeyValue(nn.Module):
    """Two parallel 3x3 convs, no non-linearity (STM sec. 3.1)."""

    def __init__(self, in_channels: int, key_dim: int, value_dim: int):
        super().__init__()
        self.key = nn.Conv2d(in_channels, key_dim, 3, padding=1)
        self.value = nn.Conv2d(in_channels, value_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key(x), self.value(x)


class QueryFeatures(NamedTuple):
    key: torch.Tensor  # B x Ck x h x w (1/16)
    value: torch.Tensor  # B x Cv x h x w
    skips: tuple[torch.Tensor, torch.Tensor]  # res3 (1/8), res2 (1/4)


class Normalize(nn.Module):
    mean: torch.Tensor  # 1 x 3 x 1 x 1 buffer
    std: torch.Tensor  # 1 x 3 x 1 x 1 buffer

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return (frames - self.mean) / self.std


class QueryEncoder(nn.Module):
    """RGB -> res4 (plus res3, res2 skips for the decoder)."""

    def __init__(self, backbone: str, pretrained: str, norm: str):
        super().__init__()
        net = build_resnet(backbone, pretrained, norm)
        self.normalize = Normalize()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.res2, self.res3, self.res4 = net.layer1, net.layer2, net.layer3

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """frames: B x 3 x H x W in [0, 1] -> res4 (1/16), res3 (1/8), res2 (1/4)."""
        r2 = self.res2(self.stem(self.normalize(frames)))
        r3 = self.res3(r2)
        return self.res4(r3), r3, r2


class MemoryEncoder(nn.Module):
    """RGB + object probability + other objects' probability -> res4.

    The two extra input channels get their own first-layer filters (randomly initialised, as the
    paper implants them), summed with the RGB filters' response: the same as a 5-channel conv1.
    """

    def __init__(self, backbone: str, pretrained: str, norm: str):
        super().__init__()
        net = build_resnet(backbone, pretrained, norm)
        self.normalize = Normalize()
        self.conv1 = net.conv1
        self.conv1_mask = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
        self.conv1_others = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
        self.stem_rest = nn.Sequential(net.bn1, net.relu, net.maxpool)
        self.res2, self.res3, self.res4 = net.layer1, net.layer2, net.layer3

    def forward(self, frames: torch.Tensor, masks: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """frames: B x 3 x H x W, masks / others: B x O x H x W probabilities -> res4 (B*O) x C x h x w.

        The RGB filters' response is the same for every object of a frame: computed once, broadcast.
        """
        o = masks.shape[1]
        rgb = self.conv1(self.normalize(frames))[:, None]  # B x 1 x 64 x H/2 x W/2
        x = rgb + self.conv1_mask(masks.flatten(0, 1)[:, None]).unflatten(0, (-1, o))
        x = (x + self.conv1_others(others.flatten(0, 1)[:, None]).unflatten(0, (-1, o))).flatten(0, 1)
        return self.res4(self.res3(self.res2(self.stem_rest(x))))


def others_probability(probs: torch.Tensor) -> torch.Tensor:
    """probs: B x O x H x W -> for each object, the summed probability of the other objects, clamped."""
    return (probs.sum(dim=1, keepdim=True) - probs).clamp(0, 1)

