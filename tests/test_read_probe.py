"""The read probe (stm_core.read_probe): what it measures on hand-made keys, and on a real network."""

import json
import math

import numpy as np
import pytest
import torch

from pipeline.evaluate.probe import probe_record, write_probe
from pipeline.report import probe_section as report_probe
from stm_core.read_probe import (
    ProbeTotals,
    label_shares,
    memory_frames,
    probe_sequence,
    read_weights,
    sink_share,
    target_read,
)


def test_read_weights_are_the_softmax_of_eq_1_with_stm_scale():
    q, k = torch.randn(5, 8), torch.randn(7, 8)
    w = read_weights(q, k)
    assert torch.allclose(w.sum(-1), torch.ones(5))
    assert torch.allclose(w, torch.softmax(q @ k.T / math.sqrt(8), -1))


def test_a_matching_read_lands_on_the_target_and_a_keyless_one_at_chance():
    # 4 query and 4 memory locations; locations 1 and 2 are the target in both frames
    share = torch.tensor([0.0, 1.0, 1.0, 0.0])
    matching = read_weights(torch.eye(4) * 20, torch.eye(4) * 20)  # each location finds its twin
    precision, chance = target_read(matching, share, share)
    assert precision == pytest.approx(1.0, abs=1e-6) and chance == 0.5
    uniform = read_weights(torch.zeros(4, 4), torch.zeros(4, 4))  # keys say nothing
    assert target_read(uniform, share, share) == pytest.approx((0.5, 0.5))
    assert sink_share(matching) == 0.25
    memory_key = torch.zeros(4, 4)
    memory_key[0] = 5.0
    sink = read_weights(torch.ones(4, 4), memory_key)  # every query location reads memory location 0
    assert sink_share(sink) == 1.0
    assert target_read(sink, share, share)[0] < 0.5  # location 0 is background: below chance
    assert all(math.isnan(x) for x in target_read(matching, torch.zeros(4), share))  # target not in view


def test_label_shares_are_area_shares_per_key_location():
    mask = torch.zeros(32, 32, dtype=torch.long)
    mask[:16, :16] = 1  # the top-left quarter
    mask[16:, 16:24] = 2
    shares = label_shares(mask, 3, (2, 2))
    assert shares.shape == (4, 3)
    assert shares[0].tolist() == [0.0, 1.0, 0.0] and shares[3].tolist() == [0.5, 0.0, 0.5]
    assert torch.allclose(shares.sum(-1), torch.ones(4))


def test_memory_frames_follow_stm_saved_frames():
    assert memory_frames(0, 12, list(range(20)), 5) == {"first": [0], "every:5": [0, 5, 10]}
    assert memory_frames(3, 9, [0, 3, 5, 8], 5) == {"first": [3], "every:5": [3, 8]}  # from the target's own start


def _video(frames: int = 5, size: int = 64):
    """A square that moves right; a second object enters at frame 2."""
    g = torch.Generator().manual_seed(0)
    imgs, masks = [], {}
    for t in range(frames):
        img = torch.rand(3, size, size, generator=g) * 0.2
        m = torch.zeros(size, size, dtype=torch.long)
        m[16:40, 8 + 4 * t: 32 + 4 * t] = 1
        if t >= 2:
            m[44:60, 40:56] = 2
        img[0][m == 1] = 0.9
        img[2][m == 2] = 0.9
        imgs.append(img)
        masks[t] = m
    return imgs, masks


def test_probe_sequence_counts_every_target_in_view_and_bounds_its_measures():
    from stm_core.model.network import ModelConfig, STMNetwork

    torch.manual_seed(0)
    net = STMNetwork(ModelConfig(decoder_dim=16, norm="group")).eval()
    frames, masks = _video()
    masks[4] = masks[4].masked_fill(masks[4] == 2, 255)  # DAVIS void: treated as background
    totals, heat = probe_sequence(net, frames, masks, every=2, heatmap_frame=3)
    # object 1: frames 1-4; object 2 (first seen at 2): frame 3 only (void at 4)
    assert set(totals) == {"first", "every:2"} and totals["first"].count == 5 == totals["every:2"].count
    for t in totals.values():
        s = t.summary()
        assert 0 <= s["precision"] <= 1 and 0 < s["chance"] < 1 and 0 < s["sink_share"] <= 1
        assert s["lift"] == pytest.approx(s["precision"] / s["chance"])
    assert sorted(heat) == [1, 2] and list(heat[2]) == [2] and heat[1][0].shape == (4, 4)
    assert float(heat[1][0].sum()) == pytest.approx(1.0, abs=1e-5)  # a read's weights over one memory frame


def _item(name, precision, chance, sink, count, picture=None):
    return {"sequence": name, "memories": {"first": {"precision": precision, "chance": chance, "sink": sink,
                                                     "count": count}},
            "picture": picture, "picture_frame": "00004" if picture else None}


def test_probe_record_weights_sequences_by_samples(tmp_path):
    items = [_item("a", 3.0, 0.3, 3.0, 3), _item("b", 0.1, 0.1, 0.0, 1, picture=b"png")]
    record = probe_record(items, 5, "models/main/model.pt")
    first = record["memories"]["first"]
    assert first["precision"] == pytest.approx(3.1 / 4) and first["chance"] == pytest.approx(0.1)
    assert first["lift"] == pytest.approx(7.75) and first["samples"] == 4 and first["sink_share"] == 0.75
    assert record["sequences"]["a"]["first"]["precision"] == 1.0 and record["picture_source"] == "b/00004"
    written = write_probe(tmp_path, items, 5, "m.pt")
    assert [p.name for p in written] == ["read_probe.json", "read_probe.png"]
    assert write_probe(tmp_path, [], 5, "m.pt") == [] and not list(tmp_path.iterdir())  # none: no stale files


def test_report_section_says_whether_the_read_finds_the_target(tmp_path):
    assert report_probe.section(tmp_path, tmp_path) == []  # no probe ran: no section
    sink = probe_record([_item("a", 0.0, 0.3, 2.8, 3)], 5, "m.pt")
    (tmp_path / "read_probe.json").write_text(json.dumps(sink))
    text = "\n".join(report_probe.section(tmp_path, tmp_path / "reports"))
    assert "does not find the target" in text and "93% of query locations" in text
    match = probe_record([_item("a", 2.4, 0.3, 0.3, 3, picture=b"png")], 5, "m.pt")
    (tmp_path / "read_probe.json").write_text(json.dumps(match))
    text = "\n".join(report_probe.section(tmp_path, tmp_path / "reports"))
    assert "The read finds the target" in text and "8.0x" in text and "../read_probe.png" in text
    (tmp_path / "read_probe.json").write_text("{")
    with pytest.raises(report_probe.ReadProbeError, match="read_probe.json: not valid JSON"):
        report_probe.section(tmp_path, tmp_path)


def test_probe_totals_merge_and_summary():
    a, b = ProbeTotals(1.0, 0.5, 1.0, 2), ProbeTotals(0.5, 0.5, 0.0, 2)
    a.merge(b)
    assert a.summary() == {"precision": 0.375, "chance": 0.25, "lift": 1.5, "sink_share": 0.25, "samples": 4}
    assert np.isfinite(ProbeTotals().summary()["precision"])
