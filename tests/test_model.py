"""The STM network: shapes for both backbones, the read against eq. (1)-(2), soft aggregation."""

from __future__ import annotations

import pytest
import torch

from stm_core.model.aggregate import soft_aggregate
from stm_core.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from stm_core.model.network import ModelConfig, STMNetwork
from stm_core.model.read import memory_read, naive_memory_read, to_tokens


@pytest.mark.parametrize("backbone,key_dim,value_dim", [("resnet18", 32, 128), ("resnet50", 128, 512)])
def test_shapes_follow_the_paper(backbone: str, key_dim: int, value_dim: int):
    net = STMNetwork(ModelConfig(backbone=backbone, norm="frozen_bn", decoder_dim=256)).eval()
    frames = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        query = net.encode_query(frames)
        assert query.key.shape == (2, key_dim, 4, 6)  # C/8 at 1/16
        assert query.value.shape == (2, value_dim, 4, 6)  # C/2
        memory = net.encode_memory(frames, torch.rand(2, 3, 64, 96))
        assert memory.key.shape == (2, 3, key_dim, 4, 6)
        assert memory.value.shape == (2, 3, value_dim, 4, 6)
        readout = net.read(query, to_tokens(memory.key), to_tokens(memory.value))
        assert readout.shape == (2, 3, 2 * value_dim, 4, 6)  # [query value, read value]
        logits = net.segment(query, to_tokens(memory.key), to_tokens(memory.value), (64, 96))
    assert logits.shape == (2, 4, 64, 96)
    assert torch.allclose(logits.softmax(1).sum(1), torch.ones(2, 64, 96), atol=1e-5)


def test_batchnorm_is_frozen():
    net = STMNetwork(ModelConfig(norm="frozen_bn", decoder_dim=256))
    norms = [m for m in net.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(type(m).__name__ == "FrozenBatchNorm2d" for m in norms)
    assert not any("running_mean" in n for n, p in net.named_parameters())


def test_group_norm_is_selectable():
    net = STMNetwork(ModelConfig(norm="group", decoder_dim=256))
    assert any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_read_equals_the_naive_formula(scale: float):
    torch.manual_seed(0)
    ck, cv, t, h, w = 8, 5, 3, 4, 5
    qk, mk, mv = torch.randn(ck, h, w), torch.randn(ck, t, h, w), torch.randn(cv, t, h, w)
    expected = naive_memory_read(qk.double(), mk.double(), mv.double(), scale=scale)
    q = to_tokens(qk)[None]  # 1 x hw x Ck
    k = mk.flatten(1).T[None]  # 1 x (T h w) x Ck
    v = mv.flatten(1).T[None]
    got = memory_read(q, k, v, scale=scale)[0].T.reshape(cv, h, w)
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_top_k_read_keeps_only_the_k_best_matches():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 4), torch.randn(2, 30, 4), torch.randn(2, 30, 3)
    full = memory_read(q, k, v)
    assert torch.allclose(memory_read(q, k, v, top_k=30), full, atol=1e-6)  # k = all: the plain read
    top1 = memory_read(q, k, v, top_k=1)
    best = (q @ k.transpose(1, 2)).argmax(-1)  # the single most similar memory location
    assert torch.allclose(top1, torch.gather(v, 1, best[..., None].expand(-1, -1, 3)), atol=1e-6)


def test_soft_aggregation_sums_to_one_and_is_differentiable():
    probs = torch.rand(2, 3, 8, 8, requires_grad=True)
    logits = soft_aggregate(probs)
    out = logits.softmax(1)
    assert torch.allclose(out.sum(1), torch.ones(2, 8, 8), atol=1e-5)
    out[:, 2].sum().backward()
    assert probs.grad is not None and probs.grad.abs().sum() > 0


def test_soft_aggregation_of_one_object_keeps_the_decision():
    p = torch.rand(1, 1, 5, 5) * 0.98 + 0.01
    out = soft_aggregate(p).softmax(1)[:, 1]
    expected = p[:, 0] ** 2 / (p[:, 0] ** 2 + (1 - p[:, 0]) ** 2)  # log-odds doubled
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(out > 0.5, p[:, 0] > 0.5)


def test_soft_aggregation_ignores_padded_objects():
    p = torch.rand(1, 2, 4, 4)
    out = soft_aggregate(p, valid=torch.tensor([[True, False]])).softmax(1)
    assert out[:, 2].max() < 1e-5


def test_checkpoint_round_trip_and_errors(tmp_path):
    net = STMNetwork(ModelConfig(norm="frozen_bn", decoder_dim=256))
    save_checkpoint(tmp_path / "m.pt", net, step=3)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["step"] == 3 and payload["model_config"]["backbone"] == "resnet18"
    loaded = load_checkpoint(tmp_path / "m.pt")
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    wrong = payload | {"model_config": {**payload["model_config"], "backbone": "resnet50"}}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="wrong.pt.*do not fit"):
        load_checkpoint(tmp_path / "wrong.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def _with_batchnorm_statistics(net: STMNetwork) -> STMNetwork:
    """Frozen BatchNorm that is not the identity, so folding it has something to get wrong."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if type(m).__name__ == "FrozenBatchNorm2d":
            n = m.weight.numel()
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return net.eval()


def test_fused_for_inference_computes_the_same_and_leaves_the_network_alone(tmp_path):
    torch.manual_seed(0)
    net = _with_batchnorm_statistics(STMNetwork(ModelConfig(norm="frozen_bn", decoder_dim=256)))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fused = net.fused_for_inference()
    assert not any(type(m).__name__ == "FrozenBatchNorm2d" for m in fused.modules())
    assert type(fused.decoder.refine2.skip_conv).__name__ == "WinogradConv2d"  # 3x3 stride 1
    assert type(fused.query_encoder.stem[0]) is torch.nn.Conv2d  # 7x7 stride 2 stays
    frames, probs = torch.rand(2, 3, 64, 96), torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        outs = []
        for model in (net, fused):
            query = model.encode_query(frames)
            memory = model.encode_memory(frames, probs)
            outs.append(model.segment(query, to_tokens(memory.key), to_tokens(memory.value), (64, 96)))
            outs.extend([query.key, memory.value])
    for a, b in zip(outs[:3], outs[3:]):  # logits, query key, memory value: equal up to rounding
        assert (a - b).abs().max() <= 1e-4 * a.abs().max(), float((a - b).abs().max() / a.abs().max())
    assert not torch.equal(outs[0], outs[3])  # a different computation did run
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="fused_for_inference"):
        save_checkpoint(tmp_path / "fused.pt", fused)


@pytest.mark.skipif(not torch.backends.nnpack.is_available(), reason="this torch build has no NNPACK")
def test_winograd_conv_times_both_kernels_once_per_shape_and_computes_the_conv():
    from stm_core.model import fast_path

    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    fast_path.winograd_convs_(conv)
    assert type(conv) is fast_path.WinogradConv2d
    x = torch.rand(2, 8, 20, 24)
    key = ((2, 8, 20, 24), (16, 8, 3, 3), torch.get_num_threads())
    fast_path._WINOGRAD_FASTER.pop(key, None)
    with torch.no_grad():
        out = conv(x)
        assert key in fast_path._WINOGRAD_FASTER  # decided once, then reused
        fast_path._WINOGRAD_FASTER[key] = not fast_path._WINOGRAD_FASTER[key]  # the other kernel
        other = conv(x)
    expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    for y in (out, other):
        assert (y - expected).abs().max() <= 1e-4 * expected.abs().max()
    fast_path._WINOGRAD_FASTER.pop(key)
    same = torch.nn.Conv2d(8, 16, 3, padding="same")  # NNPACK takes numeric padding only
    assert fast_path.winograd_convs_(same) == 0 and type(same) is torch.nn.Conv2d


def test_winograd_off_runs_the_plain_convolution_and_times_nothing():
    """A reproducible run: with the mode "off" no kernel is timed or chosen, the output is oneDNN's."""
    from stm_core.model import fast_path

    conv = torch.nn.Conv2d(16, 16, 3, padding=1).requires_grad_(False)
    fast_path.winograd_convs_(conv)
    x = torch.randn(1, 16, 40, 40)
    fast_path._WINOGRAD_FASTER.clear()
    try:
        fast_path.set_winograd_mode("off")
        assert torch.equal(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))
        assert not fast_path._WINOGRAD_FASTER
        fast_path.set_winograd_mode("auto")
        conv(x)
        assert fast_path._WINOGRAD_FASTER or not torch.backends.nnpack.is_available()
    finally:
        fast_path.set_winograd_mode("auto")
    with pytest.raises(ValueError, match="unknown Winograd mode 'fast'"):
        fast_path.set_winograd_mode("fast")


@pytest.mark.parametrize("size", [(120, 216), (37, 50), (1, 2)])
def test_stem_max_pool_after_relu_equals_max_pool2d(size):
    """The separable max-pool is exact for inputs >= 0 (even, odd and tiny maps), and the fused
    network uses it in both stems (after their ReLU)."""
    from stm_core.model import fast_path

    x = torch.relu(torch.randn(2, 4, *size))
    assert torch.equal(fast_path.MaxPoolAfterReLU()(x), torch.nn.functional.max_pool2d(x, 3, 2, 1))
    fused = STMNetwork(ModelConfig(norm="frozen_bn", decoder_dim=256)).fused_for_inference()
    assert isinstance(fused.query_encoder.stem[-1], fast_path.MaxPoolAfterReLU)
    assert isinstance(fused.memory_encoder.stem_rest[-1], fast_path.MaxPoolAfterReLU)
    assert fast_path.stem_maxpools_(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.MaxPool2d(3, 2, 1))) == 0
