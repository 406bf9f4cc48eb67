"""The optional loss on the memory read (`read_loss`): what it rewards, and how training uses it."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from training_configs import plain_loss

from pipeline.params import ParamsError
from pipeline.train import settings as train_cmd
from pipeline.train.loop import Unroll
from pipeline.train.settings import StrmnParams
from stm_core.model.network import ModelConfig, STMNetwork
from stm_core.model.read import label_shares, to_tokens
from stm_core.training import read_loss, unroll_stm

TINY_MODEL = {"backbone": "resnet18", "pretrained": "none", "norm": "frozen_bn", "decoder_dim": 16}


def halves(b: int = 1) -> torch.Tensor:
    """B x 32 x 32 ids: object 1 on the left half, background on the right."""
    m = torch.zeros(b, 32, 32, dtype=torch.long)
    m[:, :, :16] = 1
    return m


def keys_from_labels(mask: torch.Tensor, size: tuple[int, int], strength: float) -> torch.Tensor:
    """B x Ck x h x w keys that point one way on object 1 and the other way on background."""
    share = label_shares(mask, 2, size)  # B x hw x 2
    key = (share[..., 1:] - share[..., :1]) * strength  # B x hw x 1: +s on the object, -s on background
    return key.transpose(1, 2).reshape(mask.shape[0], 1, *size)


def test_label_shares_take_any_leading_dims():
    masks = torch.stack([halves()[0], torch.zeros(32, 32, dtype=torch.long)])[None]  # B=1 x T=2 x H x W
    share = label_shares(masks, 2, (2, 2))
    assert share.shape == (1, 2, 4, 2)
    assert torch.allclose(share[0, 0, :, 1], torch.tensor([1.0, 0.0, 1.0, 0.0]))  # frame 0: left column
    assert torch.allclose(share[0, 1, :, 0], torch.ones(4))  # frame 1: all background
    assert torch.equal(share[0, 0], label_shares(masks[0, 0], 2, (2, 2)))  # one mask: (h*w) x labels


def test_read_loss_rewards_reading_your_own_label():
    mask, valid, size = halves(), torch.ones(1, 1, dtype=torch.bool), (4, 4)
    matching = keys_from_labels(mask, size, 6.0)  # Ck = 1: scale 1, logits +-36 -> one label only
    memory = matching.flatten(2).transpose(1, 2)[:, None]  # B x O x L x Ck
    good = read_loss(matching, memory, mask, mask[:, None], valid)
    assert good.item() < 1e-3
    swapped = read_loss(-matching, memory, mask, mask[:, None], valid)  # object pixels read background
    assert swapped.item() > 10
    # Keys that say nothing: uniform weights, half the memory on each label -> -log(1/2).
    blank = read_loss(torch.zeros_like(matching), memory, mask, mask[:, None], valid)
    assert blank.item() == pytest.approx(math.log(2), abs=1e-5)


def test_read_loss_skips_padded_objects_and_unknown_labels():
    mask, size = halves(), (4, 4)
    key = keys_from_labels(mask, size, 6.0)
    memory = key.flatten(2).transpose(1, 2)[:, None].repeat(1, 2, 1, 1)  # O = 2, the second padded
    valid = torch.tensor([[True, False]])
    one = read_loss(key, memory, mask, mask[:, None], valid)
    memory[:, 1] = -memory[:, 1]  # the padded object's read is wrong everywhere: not counted
    assert read_loss(key, memory, mask, mask[:, None], valid).item() == pytest.approx(one.item())
    # A query label the memory never shows (an object entering) has nothing to read: not counted.
    query_mask = mask.clone()
    query_mask[:, :8, 16:] = 2  # key cells (0, 2) and (0, 3) of the 4 x 4 grid
    both = torch.tensor([[True, True]])
    key = keys_from_labels(mask, size, 1.0)  # soft weights: any change to a counted cell shows
    memory = key.flatten(2).transpose(1, 2)[:, None].repeat(1, 2, 1, 1)
    before = read_loss(key, memory, query_mask, mask[:, None], both)
    moved = key.clone()
    moved[..., 0, 2:] = torch.randn(2) * 5  # what those cells read must not matter
    assert read_loss(moved, memory, query_mask, mask[:, None], both).item() == pytest.approx(before.item())
    moved[..., 1, 2:] = -moved[..., 1, 2:]  # a counted cell does
    assert read_loss(moved, memory, query_mask, mask[:, None], both).item() != pytest.approx(before.item())


def test_unroll_adds_the_weighted_read_loss_and_trains_the_keys(one_thread):
    torch.manual_seed(0)
    net = STMNetwork(ModelConfig(**TINY_MODEL))
    frames = torch.rand(2, 3, 3, 32, 32)
    masks = halves(2)[:, None].repeat(1, 3, 1, 1)
    valid = torch.ones(2, 1, dtype=torch.bool)
    plain = unroll_stm(net, frames, masks, valid)
    off = unroll_stm(net, frames, masks, valid, read_weight=0.0)
    assert torch.equal(plain.loss, off.loss) and torch.equal(plain.logits, off.logits)
    on = unroll_stm(net, frames, masks, valid, read_weight=0.5)
    assert torch.equal(on.logits, plain.logits)  # the read loss changes the loss, not the prediction
    assert on.loss.item() > plain.loss.item()
    # The extra term reaches both key heads' weights (a memory-key bias cancels in the softmax).
    grads = {}
    for weight in (0.0, 0.5):
        net.zero_grad()
        unroll_stm(net, frames, masks, valid, read_weight=weight).loss.backward()
        grads[weight] = [net.query_kv.key.weight.grad.clone(), net.memory_kv.key.weight.grad.clone()]
    assert all(not torch.allclose(a, b) for a, b in zip(grads[0.0], grads[0.5]))


def test_unroll_module_takes_the_weight_from_the_stage_settings(one_thread):
    torch.manual_seed(0)
    net = STMNetwork(ModelConfig(**TINY_MODEL))
    frames, masks, valid = torch.rand(1, 2, 3, 32, 32), halves()[:, None].repeat(1, 2, 1, 1), torch.ones(1, 1).bool()
    plain = Unroll(net, plain_loss(), StrmnParams())(frames, masks, valid).loss
    weighted = Unroll(net, plain_loss(read_loss=1.0), StrmnParams())(frames, masks, valid).loss
    memory_key = to_tokens(net.encode_memory(frames[:, 0], masks[:, 0, None].float()).key)  # B x O x L x Ck
    expected = plain + read_loss(net.encode_query(frames[:, 1]).key, memory_key, masks[:, 1], masks[:, :1], valid)
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)


def test_negative_read_loss_is_a_params_error(tmp_path):
    params = tmp_path / "params.yaml"
    stage = {"steps": 10, "data": "data/raw/builtin-videos", "data_format": "davis", "init": "none", "max_skip": 0}
    params.write_text(yaml.safe_dump({"train": {**stage, "read_loss": -0.1}}))
    with pytest.raises(ParamsError, match=r"params.yaml: train.*read_loss must be >= 0"):
        train_cmd.settings(params, "main", "stm")
