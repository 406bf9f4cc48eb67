"""The memory read and the Fusion Cell's attention: 4-D tensors for SDPA's fused kernels, and the
chunked read of a large memory equal to the whole one and to eq. (1)-(2) written literally."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stm_core.model import read as read_module
from stm_core.model.fusion import FusionCell, fam
from stm_core.model.network import ModelConfig, STMNetwork
from stm_core.model.read import memory_read, naive_memory_read, to_tokens


@pytest.fixture()
def sdpa_shapes(monkeypatch) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Records the (query, key, value) shapes of every scaled_dot_product_attention call."""
    calls: list = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


def random_memory(n: int = 2, lq: int = 37, lm: int = 90, ck: int = 16, cv: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, lq, ck, generator=g), torch.randn(n, lm, ck, generator=g),
            torch.randn(n, lm, cv, generator=g))


def test_network_read_hands_sdpa_four_dimensional_tensors(sdpa_shapes):
    """(objects, 1 head, length, channels): the layout the fused CUDA kernels need; 3-D would fall
    back to the math path that holds the whole affinity matrix."""
    torch.manual_seed(0)
    network = STMNetwork(ModelConfig(norm="frozen_bn", decoder_dim=256)).eval()
    with torch.no_grad():
        query = network.encode_query(torch.rand(1, 3, 64, 96))
        memory = network.encode_memory(torch.rand(1, 3, 64, 96), torch.rand(1, 2, 64, 96))
        network.read(query, to_tokens(memory.key), to_tokens(memory.value))
    (q, k, v), = sdpa_shapes
    ck, cv, hw = network.config.key_dim, network.config.value_dim, 4 * 6
    assert q == (2, 1, hw, ck) and k == (2, 1, hw, ck) and v == (2, 1, hw, cv)


def test_fusion_attention_hands_sdpa_four_dimensional_tensors(sdpa_shapes):
    cell = FusionCell(8, hidden=4)
    with torch.no_grad():
        cell(torch.rand(3, 8, 5, 6), torch.rand(3, 8, 5, 6))
    assert sdpa_shapes == [((3, 1, 30, 8),) * 3] * 2  # FAM twice (eq. 3 and 7)


def test_chunked_read_equals_the_whole_read_and_eq_1_2(sdpa_shapes):
    q, k, v = random_memory()
    n, lq, lm = q.shape[0], q.shape[1], k.shape[1]
    whole = memory_read(q, k, v)
    assert len(sdpa_shapes) == 1
    sdpa_shapes.clear()
    chunk_elements = 10 * n * lm  # 10 query rows per chunk: 4 chunks, the last one of 7 rows
    chunked = memory_read(q, k, v, chunk_elements=chunk_elements)
    assert [s[0][2] for s in sdpa_shapes] == [10, 10, 10, 7]
    assert all(s[0][2] * n * lm <= chunk_elements for s in sdpa_shapes)  # never the whole matrix
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    # eq. (1)-(2) one location at a time, with the official 1/sqrt(Ck) scale
    h, w = 1, lq
    for i in range(n):
        literal = naive_memory_read(q[i].T.reshape(-1, h, w), k[i].T.reshape(-1, 1, 1, lm),
                                    v[i].T.reshape(-1, 1, 1, lm), scale=1 / math.sqrt(q.shape[-1]))
        torch.testing.assert_close(chunked[i], to_tokens(literal), rtol=1e-5, atol=1e-5)


def test_a_read_past_the_size_limit_is_chunked_by_default(monkeypatch, sdpa_shapes):
    q, k, v = random_memory(n=1, lq=50, lm=40)
    whole = memory_read(q, k, v)
    sdpa_shapes.clear()
    monkeypatch.setattr(read_module, "READ_CHUNK_ELEMENTS", 1000)
    chunked = memory_read(q, k, v)
    assert [s[0][2] for s in sdpa_shapes] == [25, 25]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def top_k_reference(q, k, v, top_k: int, scale: float) -> torch.Tensor:
    """Per query location: softmax over its top_k affinities only, everything else weight 0."""
    affinity = torch.einsum("nqc,nmc->nqm", q.double(), k.double()) * scale
    kth = affinity.topk(top_k, dim=-1).values[..., -1:]
    weights = affinity.masked_fill(affinity < kth, float("-inf")).softmax(dim=-1)
    return (weights @ v.double()).float()


def test_top_k_read_is_right_and_chunks_the_same():
    q, k, v = random_memory(lq=23, lm=60)
    scale = 1 / math.sqrt(q.shape[-1])
    expected = top_k_reference(q, k, v, 7, scale)
    whole = memory_read(q, k, v, top_k=7)
    chunked = memory_read(q, k, v, top_k=7, chunk_elements=5 * q.shape[0] * k.shape[1])
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    # k at least the memory's size: the plain read
    torch.testing.assert_close(memory_read(q, k, v, top_k=60), memory_read(q, k, v), rtol=0, atol=0)


def test_fam_is_eq_3():
    """softmax(Xa Xb^T * scale) Xb over locations, computed in float64 as the reference."""
    g = torch.Generator().manual_seed(1)
    xa, xb = torch.rand(2, 12, 4, 5, generator=g), torch.rand(2, 12, 4, 5, generator=g)
    for scale in (1.0, 1 / math.sqrt(12)):
        a, b = xa.flatten(2).double(), xb.flatten(2).double()  # N x C x hw
        weights = (a.transpose(1, 2) @ b * scale).softmax(dim=-1)  # N x hw_a x hw_b
        expected = (weights @ b.transpose(1, 2)).transpose(1, 2).reshape(xa.shape).float()
        torch.testing.assert_close(fam(xa, xb, scale), expected, rtol=1e-5, atol=1e-6)


def test_bf16_memory_is_read_in_the_query_dtype():
    q, k, v = random_memory()
    out = memory_read(q.bfloat16(), k.bfloat16(), v)  # values stored in another dtype than the query
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), memory_read(q, k, v), rtol=0.05, atol=0.05)
