"""STRMN's Fusion Cell (Nguyen & Li, sec. 3.2, eq. 3-10) and the template similarity (eq. 1-2).

The cell distils a template that is about to leave the memory (X_i) into one that stays (X_j):

    FAM(Xa, Xb) = softmax(Xa Xb^T) Xb                  (3)  align Xb to Xa's locations
    r   = sigmoid(f([X_i, FAM(X_i, X_j)]))             (4-5) filter: what of X_i to keep
    X_i' = r * X_i                                     (6)
    A   = FAM(X_j, X_i')                               (7)  X_i' aligned to X_j's locations
    z   = sigmoid(h([A, X_j]))                         (8)  update gate
    n   = tanh(g([A, X_j]))                            (9)  candidate
    X_j_new = (1 - z) * X_j + z * n                    (10)

Templates are res4 maps, N x C x h x w (any leading dims are flattened into N). FAM attends
over the h*w locations with `F.scaled_dot_product_attention` on contiguous 4-D tensors (N, 1 head,
hw, C; the channel stride 1, which every fused kernel requires). Queries, keys and values are all C
wide, so on CPU the flash kernel serves (fp32 and bf16); on CUDA the memory-efficient kernel serves
(flash there takes only fp16/bf16 and widths up to 256, and C is 1024 for ResNet-50).
`FAM_KERNELS` states this per device and tests/test_attention_kernels.py runs FAM with only that
kernel allowed, so a wrong claim fails. Scale: the paper writes no scale
(scale = 1); we default to 1/sqrt(C), as STM's official read does: res4 features are post-ReLU
with C = 256..1024 channels, and unscaled dot products saturate the softmax to one-hot at
initialisation, which starves the cell of gradient. `scale=1.0` gives the literal eq. 3
(params: `model.fusion_scale: sqrt | none`).

The similarity S that rules C and D compare (eq. 1-2) is computed on the res4 templates by
default; `similarity="keys"` computes it on the slots' read keys instead (the paper speaks of
keys; params: `model.similarity: templates | keys`). The cell only carries the choice, so the
network's one config decides it for training and inference alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend

SIMILARITIES = ("templates", "keys")
# The fused SDPA kernel that serves FAM on each device (fp32 and bf16): all widths are C.
FAM_KERNELS = {"cpu": SDPBackend.FLASH_ATTENTION, "cuda": SDPBackend.EFFICIENT_ATTENTION}


def small_cnn(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """f, g, h of the paper ("implemented with CNN"): conv3x3 -> ReLU -> conv3x3."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, out_channels, 3, padding=1),
    )


def fam(xa: torch.Tensor, xb: torch.Tensor, scale: float) -> torch.Tensor:
    """Eq. 3, xa, xb: N x C x h x w -> N x C x h x w: xb's features gathered at xa's locations."""
    n, c, h, w = xa.shape
    out = F.scaled_dot_product_attention(_one_head(xa), _one_head(xb), _one_head(xb), scale=scale)  # N x 1 x hw x C
    return out[:, 0].transpose(1, 2).reshape(n, c, h, w)


def _one_head(x: torch.Tensor) -> torch.Tensor:
    """N x C x h x w -> N x 1 x hw x C with the channels dense: an NCHW map's transpose has channel
    stride hw, which sends SDPA to its math path; a channels-last map is already dense (no copy)."""
    return x.flatten(2).transpose(1, 2).contiguous()[:, None]


class FusionCell(nn.Module):
    def __init__(self, channels: int, hidden: int = 64, scale: float | None = None, similarity: str = "templates"):
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; choose one of {SIMILARITIES}")
        self.channels = channels
        self.scale = 1.0 / math.sqrt(channels) if scale is None else scale
        self.similarity = similarity  # what rules C/D compare: res4 templates or read keys
        self.f = small_cnn(2 * channels, hidden, channels)  # filter gate r
        self.h = small_cnn(2 * channels, hidden, channels)  # update gate z
        self.g = small_cnn(2 * channels, hidden, channels)  # candidate n

    def forward(self, x_i: torch.Tensor, x_j: torch.Tensor) -> torch.Tensor:
        """x_i (removed), x_j (kept): ... x C x h x w -> the updated x_j, same shape."""
        lead = x_j.shape[:-3]
        x_i, x_j = x_i.reshape(-1, *x_i.shape[-3:]), x_j.reshape(-1, *x_j.shape[-3:])
        r = torch.sigmoid(self.f(torch.cat([x_i, fam(x_i, x_j, self.scale)], dim=1)))
        x_i = r * x_i
        a = fam(x_j, x_i, self.scale)
        both = torch.cat([a, x_j], dim=1)
        z = torch.sigmoid(self.h(both))
        n = torch.tanh(self.g(both))
        return ((1 - z) * x_j + z * n).reshape(*lead, *x_j.shape[1:])


def template_similarity(templates: torch.Tensor, upper: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 1-2 for every ordered pair of K templates: N x K x C x h x w -> N x K x K.

    S[n, i, j] = mean over locations p of X_i of max over locations q of X_j of cos(X_i(p), X_j(q)).
    S is not symmetric. `upper`: compute only j > i (what the update rules compare, i < j); the
    other entries are NaN. Rows are computed one at a time, so the peak is N x K x hw x hw.
    """
    return token_similarity(templates.flatten(3).transpose(2, 3), upper, eps)


def token_similarity(tokens: torch.Tensor, upper: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 1-2 on location tokens: N x K x L x C (templates as hw x C, or read keys) -> N x K x K."""
    n, k = tokens.shape[:2]
    tokens = F.normalize(tokens.float(), dim=-1, eps=eps)  # N x K x L x C
    sim = tokens.new_full((n, k, k), float("nan"))
    for i in range(k):
        others = tokens[:, i + 1 :] if upper else tokens
        if others.shape[1] == 0:
            continue
        cos = torch.einsum("npc,nkqc->nkpq", tokens[:, i], others)  # N x K' x hw_i x hw_j
        row = cos.amax(dim=-1).mean(dim=-1)  # N x K'
        if upper:
            sim[:, i, i + 1 :] = row
        else:
            sim[:, i] = row
    return sim
