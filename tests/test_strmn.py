"""STRMN: Fusion Cell, template similarity, the K-slot memory's update rules, and the TBPTT unroll."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from stm_core.memory import Encoded, make_memory
from stm_core.memory.recurrent import RecurrentMemory, Slots, parse_policy, select_update, update_slots
from stm_core.model.encoders import KeyValue, build_resnet
from stm_core.model.fusion import FusionCell, fam, template_similarity
from stm_core.model.network import ModelConfig, STMNetwork
from stm_core.training import strmn_segments, unroll_strmn

C, H, W = 4, 2, 3  # tiny templates for the rule tests


pytestmark = pytest.mark.usefixtures("one_thread")  # 2 shared cores: default threads oversubscribe them (10x slower)


class TagFusion(nn.Module):
    """Stand-in Fusion Cell whose output says who was fused into whom: x_j + 100 x_i."""

    def forward(self, x_i, x_j):
        return x_j + 100 * x_i


def identity_kv(feature):
    return feature * 2, feature * 3  # key, value: distinguishable, cheap


def constant_slots(values: list[float], o: int = 1) -> Slots:
    """Slots whose template s is the constant `values[s]` (B = 1, O = o)."""
    feature = torch.stack([torch.full((C, H, W), v) for v in values])[None, None].expand(1, o, -1, -1, -1, -1)
    feature = feature.contiguous()
    key, value = identity_kv(feature)
    return Slots(feature, key.flatten(-2).transpose(-1, -2), value.flatten(-2).transpose(-1, -2))


def one_template(value: float, o: int = 1) -> Slots:
    f = torch.full((1, o, C, H, W), value)
    return Slots.first(f, *identity_kv(f))


def slot_values(slots: Slots) -> list[float]:
    return [round(float(x), 3) for x in slots.feature[0, 0, :, 0, 0, 0]]


def angle_templates(degrees: list[list[float]]) -> torch.Tensor:
    """O lists of K angles -> 1 x O x K x C x H x W constant templates cos(a), sin(a), 0, 0:
    S between two of them is the cosine of their angle difference."""
    rad = torch.tensor(degrees) * math.pi / 180
    vec = torch.stack([rad.cos(), rad.sin(), torch.zeros_like(rad), torch.zeros_like(rad)], -1)
    return vec[None, :, :, :, None, None].expand(-1, -1, -1, -1, H, W).contiguous()


# ---------------------------------------------------------------- similarity and Fusion Cell


def test_similarity_matches_eq_1_2_literally():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 2, 3)  # N x K x C x h x w
    sim = template_similarity(x)
    for n in range(2):
        for i in range(3):
            for j in range(3):
                a, b = x[n, i].flatten(1).T, x[n, j].flatten(1).T  # hw x C
                cos = [[float(torch.dot(p, q) / (p.norm() * q.norm())) for q in b] for p in a]
                assert sim[n, i, j].item() == pytest.approx(sum(max(r) for r in cos) / len(cos), abs=1e-5)
    upper = template_similarity(x, upper=True)
    assert torch.allclose(upper[:, 0, 1:], sim[:, 0, 1:]) and torch.isnan(upper[:, 1, 0]).all()


def test_fam_is_softmax_alignment_and_cell_keeps_shapes():
    torch.manual_seed(0)
    xa, xb = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    a, b = xa.flatten(2).transpose(1, 2), xb.flatten(2).transpose(1, 2)
    expected = (a @ b.transpose(1, 2)).softmax(-1) @ b  # eq. 3 with scale 1
    assert torch.allclose(fam(xa, xb, 1.0), expected.transpose(1, 2).reshape(2, 3, 2, 2), atol=1e-6)
    cell = FusionCell(8, 4)
    assert cell.scale == pytest.approx(1 / math.sqrt(8))
    x_i, x_j = torch.randn(2, 3, 8, 4, 5), torch.randn(2, 3, 8, 4, 5)
    assert cell(x_i, x_j).shape == x_j.shape  # any leading dims


# ---------------------------------------------------------------- update rules


def test_rule_c_least_and_d_most_similar_pair_per_object():
    # Slot 1 (ground truth) is placed to win both rules if it were (wrongly) a candidate.
    degrees = [
        [180, 0, 10, 80, 30],  # among slots 2..5: least similar (2,4) 80deg (GT-slot 2: 180deg), most (2,3)
        [3, 0, 60, 65, 4],  # least similar (2,4) 65deg; most similar (2,5) 4deg (GT-slot 5 would be 1deg)
    ]
    feature = angle_templates(degrees)
    source, targets = select_update("C", feature)
    assert source.tolist() == [[1, 1]] and targets[..., 0].tolist() == [[3, 3]]
    source, targets = select_update("D", feature)
    assert source.tolist() == [[1, 1]] and targets[..., 0].tolist() == [[2, 4]]
    degrees[1] = [0, 50, 0, 90, 45]  # object 2: least similar pair now (3,4) at 90deg
    source, targets = select_update("C", angle_templates(degrees))
    assert source[0, 1].item() == 2 and targets[0, 1, 0].item() == 3


def test_rule_c_update_distils_i_into_j_and_removes_i():
    feature = angle_templates([[0, 0, 10, 80, 30]])
    slots = Slots(feature, *(x.flatten(-2).transpose(-1, -2) for x in identity_kv(feature)))
    new = Slots.first(torch.full((1, 1, C, H, W), 7.0), *identity_kv(torch.full((1, 1, C, H, W), 7.0)))
    out = update_slots(slots, new, 5, "C", TagFusion(), identity_kv)
    # (i, j) = slots (2, 4): slot 2 leaves, slot 4 becomes x_4 + 100 x_2, order otherwise kept.
    expected = torch.stack([feature[0, 0, 0], feature[0, 0, 2], feature[0, 0, 3] + 100 * feature[0, 0, 1],
                            feature[0, 0, 4], new.feature[0, 0, 0]])
    assert torch.equal(out.feature[0, 0], expected)
    assert torch.equal(out.key[0, 0, 2], (2 * expected[2]).flatten(1).T)  # fused slot re-keyed


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("A", [1, 3 + 200, 4 + 200, 5 + 200, 6]),  # oldest non-GT (2) into 3, 4, 5
        ("B", [1, 2 + 500, 3 + 500, 4 + 500, 6]),  # newest (5) into 2, 3, 4
        ("I2M", [1, 2 + 600, 3 + 600, 4 + 600, 5 + 600]),  # the new template into 2..5, not stored
    ],
)
def test_rules_a_b_and_i2m(rule, expected):
    out = update_slots(constant_slots([1, 2, 3, 4, 5], o=2), one_template(6, o=2), 5, rule, TagFusion(), identity_kv)
    assert slot_values(out) == expected
    assert torch.equal(out.feature[0, 0], out.feature[0, 1])  # every object updated alike
    assert torch.equal(out.value, (3 * out.feature).flatten(-2).transpose(-1, -2))  # cache in step


def test_fill_phase_appends():
    slots = one_template(1)
    for v in (2, 3):
        slots = update_slots(slots, one_template(v), 5, "C", TagFusion(), identity_kv)
    assert slot_values(slots) == [1, 2, 3]


def tiny_network(channels: int = 8) -> SimpleNamespace:
    torch.manual_seed(0)
    kv = KeyValue(channels, 2, 4)
    fusion = FusionCell(channels, 4)

    def template_key_value(feature):
        lead = feature.shape[:-3]
        k, v = kv(feature.flatten(0, -4))
        return k.reshape(*lead, *k.shape[1:]), v.reshape(*lead, *v.shape[1:])

    return SimpleNamespace(fusion=fusion, template_key_value=template_key_value, kv=kv)


@pytest.mark.parametrize("rule, updates", [("C", 1000), ("A", 100), ("B", 100), ("D", 100), ("I2M", 100)])
def test_long_run_keeps_ground_truth_bitwise_and_size_bounded(rule, updates):
    net = tiny_network()
    policy = f"recurrent:4:{rule}" if rule != "I2M" else "recurrent-i2m:4"
    memory = make_memory(policy, net)
    assert memory.wants(0) and memory.wants(12345)  # updated at every frame, as in the paper
    g = torch.Generator().manual_seed(1)

    def encoded() -> Encoded:
        feature = torch.rand(2, 8, 3, 3, generator=g)  # O = 2 objects
        key, value = net.kv(feature)
        return Encoded(feature, key, value)

    with torch.inference_mode():
        first = encoded()
        memory.add(0, first, annotated=True)
        for t in range(1, updates + 1):
            new = encoded()
            memory.add(t, new)
            assert memory.size == min(t + 1, 4)
            if rule != "I2M" or t < 4:  # M2M: the newest template is appended untouched
                assert torch.equal(memory.slots.feature[0, :, -1], new.feature)
                assert torch.equal(memory.slots.key[0, :, -1], new.key.flatten(-2).transpose(-1, -2))
                assert torch.equal(memory.slots.value[0, :, -1], new.value.flatten(-2).transpose(-1, -2))
        assert torch.equal(memory.slots.feature[0, :, 0], first.feature)
        keys, values = memory.keys_values()
        assert torch.equal(keys[:, :9], first.key.flatten(-2).transpose(-1, -2))
        assert torch.equal(values[:, :9], first.value.flatten(-2).transpose(-1, -2))
    assert keys.shape == (2, 4 * 9, 2) and values.shape == (2, 4 * 9, 4)
    assert memory.nbytes == sum(x.numel() * 4 for x in memory.slots)


def test_policy_parsing_and_errors():
    assert parse_policy("recurrent:5:C") == (5, "C")
    assert parse_policy("recurrent:3:d") == (3, "D")
    assert parse_policy("recurrent-i2m:5") == (5, "I2M")
    for bad, words in [
        ("recurrent:5", "recurrent:K:RULE"),
        ("recurrent:x:C", "K must be an integer"),
        ("recurrent:2:C", ">= 3"),
        ("recurrent:5:E", "unknown update rule"),
        ("recurrent-i2m:1", ">= 2"),
        ("recurrent-i2m:5:C", "recurrent-i2m:K"),
    ]:
        with pytest.raises(ValueError, match=words):
            make_memory(bad, tiny_network())
    with pytest.raises(ValueError, match="needs the STRMN network"):
        make_memory("recurrent:5:C", None)
    with pytest.raises(ValueError, match="Fusion Cell"):
        RecurrentMemory(5, "C", SimpleNamespace(fusion=None))
    assert isinstance(make_memory("recurrent:5:C", tiny_network()), RecurrentMemory)


# ---------------------------------------------------------------- network, GroupNorm, training


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_group_norm_backbones(backbone):
    net = build_resnet(backbone, "none", "group")
    kinds = {type(m) for m in net.modules()}
    assert nn.GroupNorm in kinds and not any(issubclass(k, nn.modules.batchnorm._NormBase) for k in kinds)
    assert net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(torch.rand(1, 3, 32, 32)))))).isfinite().all()


@pytest.fixture(scope="module")
def strmn():
    torch.manual_seed(0)
    return STMNetwork(ModelConfig(kind="strmn", backbone="resnet18", norm="group", fusion_dim=16, decoder_dim=256))


def moving_square_clip(n: int, size: int = 64, objects: int = 1):
    """B=1 clip: textured background, bright squares drifting right; masks follow them."""
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(1, n, 3, size, size, generator=g) * 0.3
    masks = torch.zeros(1, n, size, size, dtype=torch.long)
    for t in range(n):
        for k in range(objects):
            y, x = 8 + 24 * k, 8 + 3 * t
            frames[0, t, k % 3, y : y + 20, x : x + 20] = 0.9
            masks[0, t, y : y + 20, x : x + 20] = k + 1
    return frames, masks, torch.ones(1, objects, dtype=torch.bool)


def fusion_grads(network) -> dict[str, float]:
    return {name: sum(float(p.grad.abs().sum()) if p.grad is not None else 0.0
                      for p in getattr(network.fusion, name).parameters()) for name in "fgh"}


def test_gradient_reaches_f_g_h_through_tbptt_segments(strmn):
    frames, masks, valid = moving_square_clip(8, objects=2)
    strmn.zero_grad()
    segments = list(strmn_segments(strmn, frames, masks, valid, rule="C", slots=3, segment_length=4))
    assert [(s.start, s.stop) for s in segments] == [(0, 4), (4, 8)]
    assert segments[0].logits.shape == (1, 3, 3, 64, 64) and segments[1].logits.shape == (1, 4, 3, 64, 64)
    segments[0].loss.backward()
    # The first fusion happens when frame 3 enters (frames 0-2 fill K = 3), the segment's last
    # update: carried without gradient, so segment 1 alone gives f, g, h nothing...
    assert all(v == 0 for v in fusion_grads(strmn).values())
    # ...and segment 2 reads fused slots inside its graph; its backward would fail if the carried
    # memory were still attached to segment 1's freed graph.
    segments[1].loss.backward()
    assert all(v > 0 for v in fusion_grads(strmn).values()), fusion_grads(strmn)


def test_short_unroll_lowers_the_loss():
    torch.manual_seed(0)
    net = STMNetwork(ModelConfig(kind="strmn", backbone="resnet18", norm="group", fusion_dim=16, decoder_dim=256))
    frames, masks, valid = moving_square_clip(5)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)  # the paper's rate; 1e-3 saturates a random net
    losses = []
    for _ in range(10):
        out = unroll_strmn(net, frames, masks, valid, rule="C", slots=3, segment_length=10,
                           optimizer_step=lambda loss: (opt.zero_grad(), loss.backward(), opt.step()))
        losses.append(float(out.loss))
        assert out.logits.shape == (1, 4, 2, 64, 64) and not out.loss.requires_grad
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


def test_unroll_without_step_returns_a_graph_and_validates(strmn):
    frames, masks, valid = moving_square_clip(5)
    out = unroll_strmn(strmn, frames, masks, valid, rule="I2M", slots=2, segment_length=2)
    assert out.loss.requires_grad and out.logits.shape[1] == 4
    with pytest.raises(ValueError, match="rule"):
        unroll_strmn(strmn, frames, masks, valid, rule="E")
    with pytest.raises(ValueError, match="STRMN network"):
        unroll_strmn(SimpleNamespace(fusion=None), frames, masks, valid)


def test_inference_core_runs_recurrent_memory(strmn):
    from stm_core.inference import InferenceCore

    frames, masks, _ = moving_square_clip(7, objects=2)
    core = InferenceCore(strmn, "recurrent:3:C")
    core.step(frames[0, 0], masks[0, 0])
    for t in range(1, 7):
        probs = core.step(frames[0, t])
        assert probs.shape == (3, 64, 64) and core.groups[0].memory.size == min(t + 1, 3)


def test_validate_policy_checks_recurrent_syntax():
    from stm_core.memory import validate_policy

    assert validate_policy("recurrent:5:C") == "recurrent:5:C"
    assert validate_policy("recurrent-i2m:4") == "recurrent-i2m:4"
    with pytest.raises(ValueError, match="memory policy"):
        validate_policy("recurrent:5:Q")
