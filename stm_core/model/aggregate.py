"""Soft aggregation of per-object probabilities (STM sec. 3.4, after RGMP), differentiable."""

from __future__ import annotations

import torch

EPS = 1e-7


def soft_aggregate(probs: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Merge independent per-object foreground probabilities into one distribution.

    probs: B x O x H x W, each object's P(foreground) estimated alone.
    valid: B x O bool, False for padded (absent) objects, which get probability ~0.
    Returns logits B x (1+O) x H x W; channel 0 is background; softmax(logits) sums to 1. Each
    channel's logit is log(q / (1 - q)) of its probability q, as in the official STM code, so one
    object with probability p comes out as p^2 / (p^2 + (1-p)^2): the same decision, sharpened.
    """
    if valid is not None:
        probs = probs * valid[:, :, None, None].to(probs.dtype)
    background = torch.prod(1 - probs, dim=1, keepdim=True)  # all objects say "not mine"
    merged = torch.cat([background, probs], dim=1).clamp(EPS, 1 - EPS)
    return torch.log(merged / (1 - merged))
