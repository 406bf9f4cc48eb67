"""Refinement-module decoder (STM sec. 3.3, after RGMP): 1/16 -> 1/8 -> 1/4, 2-channel output."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# (fn, x, halo) -> fn(x), computed in row bands by more than one thread (`stm_core.lane.SideLane.rows_in_two`)
RowSplit = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, int], torch.Tensor]


class ResBlock(nn.Module):
    """Pre-activation residual block (He et al., identity mappings)."""

    def __init__(self, in_dim: int, out_dim: int | None = None):
        super().__init__()
        out_dim = out_dim or in_dim
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, padding=1)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1)
        self.skip = None if in_dim == out_dim else nn.Conv2d(in_dim, out_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.conv2(F.relu(self.conv1(F.relu(x))))
        return (x if self.skip is None else self.skip(x)) + r


class RefinementModule(nn.Module):
    """Merge a skip connection from the query encoder with the upsampled coarser decoder state."""

    def __init__(self, skip_dim: int, dim: int):
        super().__init__()
        self.skip_conv = nn.Conv2d(skip_dim, dim, 3, padding=1)
        self.skip_res = ResBlock(dim)
        self.merge_res = ResBlock(dim)

    def skip(self, skip: torch.Tensor) -> torch.Tensor:
        """B x Cs x 2h x 2w -> B x D x 2h x 2w: depends on the frame only, so shared by its objects."""
        return self.skip_res(self.skip_conv(skip))

    def merge(self, s: torch.Tensor, coarse: torch.Tensor, split: RowSplit | None = None) -> torch.Tensor:
        """s: B x D x 2h x 2w (from `skip`), coarse: (B*O) x D x h x w -> (B*O) x D x 2h x 2w."""
        up = F.interpolate(coarse, size=s.shape[-2:], mode="bilinear", align_corners=False)
        x = (s[:, None] + up.unflatten(0, (s.shape[0], -1))).flatten(0, 1)
        # merge_res is two 3x3 convs: an output row depends on 2 input rows either side.
        return self.merge_res(x) if split is None else split(self.merge_res, x, 2)


class Decoder(nn.Module):
    def __init__(self, readout_dim: int, res3_dim: int, res2_dim: int, dim: int = 256):
        super().__init__()
        self.compress = nn.Conv2d(readout_dim, dim, 3, padding=1)
        self.compress_res = ResBlock(dim)
        self.refine3 = RefinementModule(res3_dim, dim)
        self.refine2 = RefinementModule(res2_dim, dim)
        self.predict = nn.Conv2d(dim, 2, 3, padding=1)

    def skip_features(
        self, res3: torch.Tensor, res2: torch.Tensor  # B x C3 x 2h x 2w, B x C2 x 4h x 4w
    ) -> tuple[torch.Tensor, torch.Tensor]:  # B x D x 2h x 2w, B x D x 4h x 4w
        """The refinement modules' skip paths: they depend on the frame only, so they can run before
        (and beside) the memory read, once for all objects."""
        return self.refine3.skip(res3), self.refine2.skip(res2)

    def forward(
        self,
        readout: torch.Tensor,  # (B*O) x (2 Cv) x h x w, objects of a frame adjacent
        res3: torch.Tensor,  # B x C3 x 2h x 2w, the frame's (not repeated per object)
        res2: torch.Tensor,  # B x C2 x 4h x 4w
        out_size: tuple[int, int],
        skip_features: tuple[torch.Tensor, torch.Tensor] | None = None,  # from `skip_features(res3, res2)`
        split: RowSplit | None = None,  # CPU inference: the merges' convs in row bands on two threads
    ) -> torch.Tensor:  # (B*O) x 1 x H x W foreground-minus-background logit
        s3, s2 = self.skip_features(res3, res2) if skip_features is None else skip_features
        x = self.compress_res(self.compress(readout))
        x = self.refine3.merge(s3, x, split)
        x = self.refine2.merge(s2, x, split)
        logits = self.predict(F.relu(x))  # 1/4 scale, (background, foreground)
        # softmax over (bg, fg) == sigmoid(fg - bg); bilinear upsampling is linear, so the
        # difference is taken first and one channel is upsampled instead of two.
        return F.interpolate(logits[:, 1:] - logits[:, :1], size=out_size, mode="bilinear", align_corners=False)
