"""Streaming inference on real DAVIS-layout data, and `stm segment` end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.cli import main as stm
from stm_core.data.io import read_frame, read_index_mask
from stm_core.inference import InferenceCore, pad_to_stride, probabilities_to_mask, segment_video, unpad
from stm_core.model.checkpoint import save_checkpoint
from stm_core.model.network import ModelConfig, STMNetwork

SIZE = (96, 170)  # DAVIS 480p scaled down: the tests are about bookkeeping, not accuracy


@pytest.fixture(scope="module")
def network() -> STMNetwork:
    torch.manual_seed(0)
    return STMNetwork(ModelConfig(norm="frozen_bn", decoder_dim=256)).eval()


def small(frame: torch.Tensor) -> torch.Tensor:
    return F.interpolate(frame[None], size=SIZE, mode="bilinear", align_corners=False)[0]


def small_mask(ids: np.ndarray) -> torch.Tensor:
    return F.interpolate(torch.from_numpy(ids)[None, None].float(), size=SIZE, mode="nearest")[0, 0].long()


def test_padding_round_trips():
    x = torch.rand(2, 3, 37, 50)
    padded, pad = pad_to_stride(x)
    assert padded.shape[-2] % 16 == 0 and padded.shape[-1] % 16 == 0
    assert torch.equal(unpad(padded, pad), x)


def test_judo_objects_enter_mid_video(network: STMNetwork, davis_sample: Path):
    """judo: objects 1..4 are introduced by masks at frames 0, 5, 8, 13."""
    frames = sorted((davis_sample / "JPEGImages/480p/judo").glob("*.jpg"))
    annotations = {int(p.stem): p for p in (davis_sample / "Annotations/480p/judo").glob("*.png")}
    assert sorted(annotations) == [0, 5, 8, 13]
    introduced = {0: 1, 5: 2, 8: 3, 13: 4}
    core = InferenceCore(network, "every:5")
    expected: list[int] = []
    for t, path in enumerate(frames):
        mask = small_mask(read_index_mask(annotations[t])) if t in annotations else None
        if t in introduced:
            expected.append(introduced[t])
        probs = core.step(small(read_frame(path)), mask)
        assert core.object_ids == expected, f"frame {t}"
        assert probs.shape == (1 + len(expected), *SIZE)
        assert torch.allclose(probs.sum(0), torch.ones(SIZE), atol=1e-4)
        ids = probabilities_to_mask(probs, core.object_ids)
        assert set(ids.unique().tolist()) <= {0, *expected}
        if t in introduced:  # the annotation is ground truth on its own frame
            new = introduced[t]
            assert torch.equal(ids == new, mask == new), f"frame {t}"
    # every group keeps its own memory: group k started at its annotation frame
    assert [g.object_ids for g in core.groups] == [[1], [2], [3], [4]]
    assert core.groups[0].memory.size == 4  # frames 0, 5, 10 and the previous frame 15


def test_memory_encodings_are_not_recomputed(network: STMNetwork, monkeypatch):
    """`first` never encodes after the first frame; `every:5` encodes each frame once."""
    calls = []
    original = network.encode_memory
    monkeypatch.setattr(network, "encode_memory", lambda *a, **k: calls.append(1) or original(*a, **k))
    mask = torch.zeros(SIZE, dtype=torch.long)
    mask[20:60, 30:90] = 1
    for policy, expected_calls in [("first", 1), ("every:5", 10)]:
        calls.clear()
        core = InferenceCore(network, policy)
        for t in range(10):
            core.step(torch.rand(3, *SIZE), mask if t == 0 else None)
        core.synchronize()  # the last frame's memory encoding may still run beside the caller
        assert len(calls) == expected_calls, policy


def test_segment_video_yields_annotation_on_annotated_frames(network: STMNetwork):
    mask = torch.zeros(SIZE, dtype=torch.long)
    mask[10:50, 10:60] = 3
    mask[60:90, 100:160] = 5
    outs = list(segment_video(network, (torch.rand(3, *SIZE) for _ in range(4)), {0: mask}, "first+previous"))
    assert len(outs) == 4 and outs[0].dtype == torch.uint8
    assert torch.equal(outs[0].long(), mask)
    assert all(set(o.unique().tolist()) <= {0, 3, 5} for o in outs)


@pytest.mark.slow
def test_stm_segment_end_to_end_on_car_shadow(tmp_path: Path, davis_sample: Path, network: STMNetwork,
                                             monkeypatch):
    """Palette PNGs for every frame, the annotation exact, and fixed CPU kernels while segmenting
    (reproducible runs) unless --timed-kernels; the process's kernel mode is restored after."""
    import stm_core.segment as segment
    from stm_core.model import fast_path

    modes = []
    run_video = segment.segment_video
    monkeypatch.setattr(segment, "segment_video", lambda *a, **k: (modes.append(fast_path.winograd_mode()),
                                                                   run_video(*a, **k))[1])
    frames_src = davis_sample / "JPEGImages/480p/car-shadow"
    frames = tmp_path / "frames"
    frames.mkdir()
    for p in sorted(frames_src.glob("*.jpg"))[:8]:  # a short clip keeps the test fast
        (frames / p.name).symlink_to(p)
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "00000.png").symlink_to(davis_sample / "Annotations/480p/car-shadow/00000.png")
    ckpt = tmp_path / "random.pt"
    save_checkpoint(ckpt, network)
    out = tmp_path / "out"
    code = stm(["segment", "--checkpoint", str(ckpt), "--frames", str(frames), "--masks", str(masks),
                "--out", str(out), "--memory", "every:5", "--max-size", "160"])
    assert code == 0
    written = sorted(out.glob("*.png"))
    assert [p.name for p in written] == [f"{i:05d}.png" for i in range(8)]
    with Image.open(written[3]) as im, Image.open(masks / "00000.png") as src:
        assert im.mode == "P" and im.size == (854, 480)
        assert im.getpalette()[:6] == src.getpalette()[:6]  # the input masks' palette
        assert set(np.unique(np.asarray(im)).tolist()) <= {0, 1}
    assert np.array_equal(np.asarray(Image.open(written[0])), read_index_mask(masks / "00000.png"))
    assert stm(["segment", "--checkpoint", str(ckpt), "--frames", str(frames), "--masks", str(masks),
                "--out", str(tmp_path / "timed"), "--max-size", "64", "--timed-kernels"]) == 0
    assert modes == ["off", "auto"] and fast_path.winograd_mode() == "auto"


def test_stm_segment_refuses_without_checkpoint(tmp_path: Path, capsys):
    assert stm(["segment", "--frames", str(tmp_path), "--masks", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err


def test_stm_segment_wrong_architecture_is_a_clear_error(tmp_path: Path, capsys):
    state = STMNetwork(ModelConfig(norm="frozen_bn", decoder_dim=256)).state_dict()
    torch.save({"kind": "stm", "model_config": {"backbone": "resnet50"}, "state_dict": state}, tmp_path / "x.pt")
    (tmp_path / "f").mkdir()
    code = stm(["segment", "--checkpoint", str(tmp_path / "x.pt"), "--frames", str(tmp_path / "f"),
                "--masks", str(tmp_path / "f"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "x.pt" in capsys.readouterr().err


def test_stm_segment_names_a_mask_of_the_wrong_size(tmp_path: Path, davis_sample: Path, network, capsys):
    ckpt = tmp_path / "random.pt"
    save_checkpoint(ckpt, network)
    code = stm(["segment", "--checkpoint", str(ckpt), "--frames", str(davis_sample / "JPEGImages/480p/judo"),
                "--masks", str(davis_sample / "Annotations/480p/judo"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "00005.png: mask is 853x480 but frame 00005.jpg is 854x480" in capsys.readouterr().err


def test_two_objects_are_aggregated_once(network: STMNetwork):
    """Frame 1's output is softmax(soft_aggregate(each object's P(fg))), computed once, and the same
    probabilities are what frame 1 memorises (a second aggregation moves uncertain pixels to bg)."""
    from stm_core.model.aggregate import soft_aggregate

    torch.manual_seed(1)
    frames = [torch.rand(3, *SIZE) for _ in range(3)]
    mask = torch.zeros(SIZE, dtype=torch.long)
    mask[10:50, 10:80] = 1
    mask[40:90, 60:150] = 2
    core = InferenceCore(network, "first+previous")
    first = core.step(frames[0], mask)
    assert torch.equal(first, torch.stack([mask == 0, mask == 1, mask == 2]).float())  # the annotation itself
    out = core.step(frames[1])

    with torch.inference_mode():  # the same frame by the stateless network's methods
        image, pad = pad_to_stride(frames[0][None])
        onehot = F.pad(first[None, 1:], pad)
        memory = network.encode_memory(image, onehot)
        keys = memory.key.flatten(-2).transpose(-1, -2)  # 1 x O x hw x Ck
        values = memory.value.flatten(-2).transpose(-1, -2)
        query_image, _ = pad_to_stride(frames[1][None])
        query = network.encode_query(query_image)
        fg = torch.sigmoid(unpad(network.decode(network.read(query, keys, values), query.skips,
                                                query_image.shape[-2:]), pad))
        expected = soft_aggregate(fg)[0].softmax(dim=0)
    assert torch.allclose(out, expected, atol=1e-5)
    twice = soft_aggregate(expected[None, 1:])[0].softmax(dim=0)
    assert not torch.allclose(out, twice, atol=1e-3)  # the check can tell the two apart
    assert torch.allclose(out.sum(0), torch.ones(SIZE), atol=1e-5)


def test_padding_is_zeros_split_around_the_image():
    x = torch.rand(1, 3, 150, 270) + 1  # no zeros inside the image
    padded, pad = pad_to_stride(x)
    assert padded.shape[-2:] == (160, 272) and pad == (1, 1, 5, 5)
    assert padded[..., :5, :].abs().sum() == 0 and padded[..., -5:, :].abs().sum() == 0
    assert padded[..., :, :1].abs().sum() == 0 and padded[..., :, -1:].abs().sum() == 0


def test_memory_encoding_beside_the_next_query_computes_the_same(network: STMNetwork, monkeypatch):
    """overlap (the CPU default) runs one object's memory encoding of frame t on a second thread
    beside frame t+1's query encoding, and the decoder's merges in two row bands: the same
    probabilities as one thread, the memory up to date when read, an error on the second thread
    raised by the next step; two objects run on the caller's thread alone."""
    import threading

    if torch.get_num_threads() < 2:
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the lane splits 2 threads 1 + 1
    torch.manual_seed(1)
    frames = [torch.rand(3, *SIZE) for _ in range(8)]
    one = torch.zeros(SIZE, dtype=torch.long)
    one[20:60, 30:90] = 1
    two = one.clone()
    two[60:90, 100:160] = 2
    for mask, on_lane in ((one, True), (two, False)):
        outs = {}
        for overlap in (False, True):
            core = InferenceCore(network, "every:3", overlap=overlap)
            threads = []
            encode = core.network.encode_memory
            monkeypatch.setattr(core.network, "encode_memory", lambda *a, threads=threads, encode=encode, **k:
                                threads.append(threading.current_thread().name) or encode(*a, **k))
            outs[overlap] = [core.step(f, mask if t == 0 else None) for t, f in enumerate(frames)]
            assert core.groups[0].memory.size == 4  # frames 0, 3, 6 and the previous frame 7: synchronised
            assert len(threads) == 8
            lane_calls = sum(name.startswith("stm-side-lane") for name in threads)
            assert lane_calls == (8 if overlap and on_lane else 0), threads
            assert (core._lanes._lane is not None) == (overlap and on_lane)  # several objects: all threads, in turn
            core.close()
        for a, b in zip(outs[False], outs[True]):
            assert (a - b).abs().max() <= 1e-5

    core = InferenceCore(network, "every:3", overlap=True)
    core.step(frames[0], one)
    core.synchronize()  # frame 0 memorised with the real encoder
    monkeypatch.setattr(core.network, "encode_memory", lambda *a, **k: (_ for _ in ()).throw(OSError("lane")))
    core.step(frames[1])  # its memory encoding fails on the lane, after this step returned
    with pytest.raises(OSError, match="lane"):
        core.step(frames[2])


def test_oracle_memory_memorises_the_truth_and_returns_the_prediction(network: STMNetwork, monkeypatch):
    """`truth`: frames the policy memorises hold the ground truth (one-hot, untracked ids as background);
    the returned probabilities are the prediction, equal to a run without truth up to that memory."""
    size = (96, 160)  # a multiple of the stride: memorised masks are not padded
    frames = [torch.rand(3, *size) for _ in range(4)]
    first = torch.zeros(size, dtype=torch.long)
    first[10:50, 10:60] = 3
    truth = torch.zeros(size, dtype=torch.long)
    truth[40:80, 90:150] = 3  # the object "moved": unlike anything the model predicts
    truth[0:10, 0:20] = 9  # an id that is not tracked: background in memory
    memorised = []
    original = network.encode_memory
    monkeypatch.setattr(network, "encode_memory",
                        lambda image, probs, others: memorised.append(probs.clone()) or original(image, probs, others))
    plain, oracle = InferenceCore(network, "every:1", overlap=False), InferenceCore(network, "every:1", overlap=False)
    outs = []
    for t, frame in enumerate(frames):
        mask = first if t == 0 else None
        p = plain.step(frame, mask)
        o = oracle.step(frame, mask, truth=truth if t > 0 else None)
        outs.append((p, o))
    # frame 1 reads only frame 0's memory: the same for both; later frames read the truth instead
    assert torch.allclose(outs[1][0], outs[1][1], atol=1e-6)
    assert not torch.allclose(outs[2][0], outs[2][1], atol=1e-3)
    oracle_encodings = memorised[1::2]  # the two cores alternate, plain first
    assert torch.equal(oracle_encodings[1][0, 0], (truth == 3).float())  # object 3 exactly as the truth
    assert oracle_encodings[1][0, 0, 5, 5] == 0  # untracked id 9 is not object 3
    assert not torch.equal(memorised[2][0, 0], (truth == 3).float())  # the plain core memorised its prediction


def test_probabilities_to_mask_is_argmax_with_ties_to_the_first_object():
    from stm_core.inference import probabilities_to_mask

    torch.manual_seed(0)
    probs = torch.randint(0, 3, (4, 40, 50)).float()  # many exact ties
    ids = [3, 5, 9]
    expected = torch.tensor([0, *ids], dtype=torch.uint8)[probs.argmax(dim=0)]
    assert torch.equal(probabilities_to_mask(probs, ids), expected)
