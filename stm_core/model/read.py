"""Space-time memory read, eq. (1)-(2) of the STM paper.

Every query location attends over all T x H x W memory locations. The affinity is
exp(k_q . k_m * scale), normalised over memory (a softmax), so `F.scaled_dot_product_attention`
computes exactly eq. (1)'s weighted sum. `scale` defaults to 1/sqrt(Ck) as in the official STM
code (the paper's eq. 2 is the scale=1 case).

SDPA gets 4-D tensors (batch = objects, heads = 1, length, channels), the channel dim dense on
CUDA. Keys are Ck wide (128 for ResNet-50) and values Cv (512): flash attention needs equal widths,
on CUDA and on CPU, so it never serves the read. On CUDA the memory-efficient kernel does (fp32 and
bf16; it takes values wider than keys) and never holds the Lq x Lm affinity matrix. On CPU the only
fused kernel is flash, so the read takes the math path (two matmuls and a softmax, with the
affinity matrix). `READ_KERNELS` states this per device and tests/test_attention_kernels.py runs
the read with only that kernel allowed (and checks that flash refuses it), so a wrong claim fails.
The math path, and the top-k read, hold the affinities: a read
whose N x Lq x Lm affinities exceed `READ_CHUNK_ELEMENTS` runs over query locations in chunks
(each query row's result depends only on that row, so chunks compute the same thing), and a long
or 720p video never allocates the whole matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

# Affinity elements (N x Lq x Lm) one read may hold at once: 2^26 fp32 = 256 MiB, with the softmax's
# copy ~0.5 GiB, next to ~1 GiB of ResNet-50 activations at 480p. A 480p frame (30 x 54 = 1620
# locations) against 20 memory frames is 1620 x 32400 = 52M per object: one object reads in one
# piece, five in about four chunks of whole query rows, which keeps each matmul large.
READ_CHUNK_ELEMENTS = 1 << 26
# The SDPA kernel that serves the read on each device (keys Ck wide, values Cv = 4 Ck).
READ_KERNELS = {"cpu": SDPBackend.MATH, "cuda": SDPBackend.EFFICIENT_ATTENTION}


def memory_read(
    query_key: torch.Tensor,  # N x Lq x Ck (query locations as tokens)
    memory_key: torch.Tensor,  # N x Lm x Ck (Lm = T * h * w)
    memory_value: torch.Tensor,  # N x Lm x Cv
    top_k: int | None = None,
    scale: float | None = None,
    chunk_elements: int | None = None,  # affinities held at once; None: READ_CHUNK_ELEMENTS
) -> torch.Tensor:  # N x Lq x Cv
    scale = 1.0 / math.sqrt(query_key.shape[-1]) if scale is None else scale
    n, lq = query_key.shape[:2]
    lm = memory_key.shape[1]
    # SDPA wants matching dtypes; memory may be stored in a lower precision than the query.
    memory_key = memory_key.to(query_key.dtype)
    memory_value = memory_value.to(query_key.dtype)
    if memory_key.is_cuda:  # the fused kernels want the channel dim contiguous (else: the math path)
        query_key, memory_key, memory_value = (_dense_channels(x) for x in (query_key, memory_key, memory_value))
    use_top_k = top_k is not None and top_k < lm

    def read(q: torch.Tensor) -> torch.Tensor:  # N x rows x Ck -> N x rows x Cv
        if use_top_k:
            assert top_k is not None  # use_top_k implies it
            return _top_k_read(q, memory_key, memory_value, top_k, scale)
        return F.scaled_dot_product_attention(q[:, None], memory_key[:, None], memory_value[:, None],
                                              scale=scale)[:, 0]  # one head: N x 1 x L x C

    limit = READ_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    rows = max(1, limit // max(1, n * lm))  # query locations per chunk
    if rows >= lq:
        return read(query_key)
    return torch.cat([read(query_key[:, i : i + rows]) for i in range(0, lq, rows)], dim=1)


def _dense_channels(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _top_k_read(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, top_k: int, scale: float) -> torch.Tensor:
    """Keep, per query location, only the k most similar memory locations (Cheng et al., STCN/XMem)."""
    affinity = torch.einsum("nqc,nmc->nqm", q, k) * scale  # N x Lq x Lm
    values, indices = affinity.topk(top_k, dim=-1)  # N x Lq x k
    weights = values.softmax(dim=-1)
    # out[n, q] = sum_k weights[n, q, k] * v[n, indices[n, q, k]]
    gathered = torch.gather(
        v.unsqueeze(1).expand(-1, q.shape[1], -1, -1),
        2,
        indices.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1]),
    )  # N x Lq x k x Cv
    return (weights.unsqueeze(-1) * gathered).sum(dim=2)


def naive_memory_read(
    query_key: torch.Tensor,  # Ck x H x W
    memory_key: torch.Tensor,  # Ck x T x H x W
    memory_value: torch.Tensor,  # Cv x T x H x W
    scale: float = 1.0,
) -> torch.Tensor:  # Cv x H x W
    """Eq. (1)-(2) written literally, one query location at a time (for tests, not for use)."""
    ck, h, w = query_key.shape
    mk = memory_key.reshape(ck, -1)  # Ck x THW
    mv = memory_value.reshape(memory_value.shape[0], -1)  # Cv x THW
    out = torch.empty(memory_value.shape[0], h, w, dtype=query_key.dtype)
    for y in range(h):
        for x in range(w):
            f = torch.exp((query_key[:, y, x] @ mk) * scale)  # similarity to every memory location
            out[:, y, x] = (mv * f).sum(dim=1) / f.sum()
    return out


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """... x C x h x w feature map -> ... x (h*w) x C tokens."""
    return x.flatten(-2).transpose(-1, -2)


def label_shares(mask: torch.Tensor, num_labels: int, size: tuple[int, int]) -> torch.Tensor:
    """mask: ... x H x W ids in 0..num_labels-1 -> ... x (h*w) x num_labels: each label's area share
    per key location (what a read should find where: the read loss and the read probe)."""
    flat = mask.long().reshape(-1, *mask.shape[-2:])
    one_hot = F.one_hot(flat, num_labels).permute(0, 3, 1, 2).float()  # N x labels x H x W
    return to_tokens(F.adaptive_avg_pool2d(one_hot, size)).reshape(*mask.shape[:-2], -1, num_labels)
