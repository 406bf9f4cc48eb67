"""The hard built-in benchmark: events where memory matters, deterministic by seed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stm_core.data.builtin_videos import BuiltinVideosConfig, write_builtin_videos
from stm_core.data.io import read_index_mask

HARD = BuiltinVideosConfig(height=96, width=96, frames=48, train_sequences=0, val_sequences=6,
                           object_size=[0.22, 0.32], enter_prob=1.0, leave_prob=1.0)


@pytest.fixture(scope="module")
def hard_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    write_builtin_videos(root, HARD, seed=3)
    return root


def _masks(root, name: str, frames: int) -> np.ndarray:
    return np.stack([read_index_mask(root / "Annotations/480p" / name / f"{t:05d}.png") for t in range(frames)])


def test_hard_sequences_have_the_events(hard_root):
    info = json.loads((hard_root / "builtin.json").read_text())["sequences"]
    left_and_returned = occluded = entered = 0
    for seq in info:
        masks = _masks(hard_root, seq["sequence"], HARD.frames)
        for obj, ev in seq["targets"].items():
            present = np.array([(m == int(obj)).any() for m in masks])
            first = int(np.argmax(present))
            assert first == seq["first_frame"][obj]
            for a, b in ev["out_of_frame"]:
                # gone from the annotations for the whole span, back afterwards
                assert not present[a:b].any() and present[b:].any()
                left_and_returned += 1
            occluded += bool(ev["occluded"] or ev["hidden"])
            entered += ev["enter"] > 0
            if ev["enter"] > 0:
                assert not present[:ev["enter"]].any() and present[ev["enter"]]
        assert seq["distractors"] == 1 and seq["occluders"] == 1
    assert left_and_returned >= 3 and occluded >= 3 and entered >= 1


def test_hard_objects_change_appearance(hard_root):
    """Scale drifts: an object's area late in the video differs clearly from its first area."""
    info = json.loads((hard_root / "builtin.json").read_text())["sequences"]
    ratios = []
    for seq in info:
        masks = _masks(hard_root, seq["sequence"], HARD.frames)
        for obj, ev in seq["targets"].items():
            areas = (masks == int(obj)).sum(axis=(1, 2))
            hidden = {t for a, b in ev["out_of_frame"] + ev["occluded"] + ev["hidden"] for t in range(a, b)}
            clear = [t for t in range(HARD.frames) if areas[t] > 0 and t not in hidden]
            ratios.append(areas[clear[-1]] / areas[clear[0]])
    assert max(abs(np.log(r)) for r in ratios) > np.log(1.6)


def test_hard_is_deterministic_by_seed(tmp_path):
    cfg = BuiltinVideosConfig(height=48, width=48, frames=12, train_sequences=1, val_sequences=1)
    write_builtin_videos(tmp_path / "a", cfg, seed=1)
    write_builtin_videos(tmp_path / "b", cfg, seed=1)
    write_builtin_videos(tmp_path / "c", cfg, seed=2)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files
    same = all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    differ = any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()
                 for f in files if f.suffix == ".jpg")
    assert same and differ


def test_easy_style_stays_available(tmp_path):
    cfg = BuiltinVideosConfig(height=48, width=48, frames=6, train_sequences=0, val_sequences=1, style="easy")
    info = write_builtin_videos(tmp_path, cfg, seed=0)
    assert "targets" not in info[0]
    with pytest.raises(ValueError, match="style"):
        BuiltinVideosConfig(style="medium")


def test_recurrent_5_c_keeps_5_entries_and_flat_memory_on_the_longest_sequence(tmp_path):
    """The embedded benchmark's sequence length (params.yaml), one object group: K = 5 slots, constant bytes."""
    import dataclasses
    from pathlib import Path

    import torch

    from pipeline.download.stage import read_params
    from pipeline.params import load_params
    from stm_core.data.io import read_image, to_tensor
    from stm_core.inference import InferenceCore, memory_bytes, memory_entries
    from stm_core.model.network import ModelConfig, STMNetwork

    _, sources = read_params(load_params(Path(__file__).resolve().parents[1] / "params.yaml"), ["builtin-videos"])
    fields = {f.name for f in dataclasses.fields(BuiltinVideosConfig)}
    cfg = BuiltinVideosConfig(**{k: v for k, v in dataclasses.asdict(sources["builtin-videos"]).items() if k in fields})
    cfg = dataclasses.replace(cfg, train_sequences=0, val_sequences=1, height=64, width=64)  # length as embedded
    write_builtin_videos(tmp_path, cfg, seed=0)
    torch.manual_seed(0)
    net = STMNetwork(ModelConfig(kind="strmn", norm="group", decoder_dim=16, fusion_dim=8))
    core = InferenceCore(net, "recurrent:5:C", device="cpu")
    entries, sizes = [], []
    with torch.inference_mode():
        for t in range(cfg.frames):
            frame = to_tensor(read_image(tmp_path / "JPEGImages/480p/val-000" / f"{t:05d}.jpg"))
            mask = torch.from_numpy(read_index_mask(tmp_path / "Annotations/480p/val-000/00000.png")).long() if t == 0 else None
            core.step(frame, mask)
            entries.append(memory_entries(core))
            sizes.append(memory_bytes(core))
    assert cfg.frames >= 80
    assert max(entries) == 5 and entries[-1] == 5 and entries[5:] == [5] * (cfg.frames - 5)
    assert len(set(sizes[5:])) == 1  # flat: the same bytes from the moment the memory is full
