"""Official STM weights: `stm import-official`, and inference equal to the official implementation.

The proof uses `../shared/official-stm/` (beside the repo, not in it): weights in the official
layout rebuilt by its `make_weights.py`, 10 real frames with a two-object annotation, and what the
official `Run_video` outputs for them (`expected.npz`). The import's error handling is tested on
self-made files and needs nothing from `../shared`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stm_core.inference as inference
from pipeline.cli import main as stm
from stm_core.data.io import read_frame, read_index_mask
from stm_core.inference import InferenceCore
from stm_core.model.aggregate import soft_aggregate
from stm_core.model.checkpoint import load_checkpoint
from stm_core.model.network import STMNetwork
from stm_core.model.official import OFFICIAL_CONFIG, _official_name

OFFICIAL = (Path(__file__).resolve().parents[1] / ".." / "shared" / "official-stm").resolve()
FRAMES = 10


@pytest.fixture(scope="module")
def official_dir() -> Path:
    if not (OFFICIAL / "expected.npz").is_file():
        pytest.skip(f"official STM fixture not found at {OFFICIAL} (it ships beside the repo, not in it)")
    return OFFICIAL


@pytest.fixture(scope="module")
def imported(official_dir: Path, tmp_path_factory) -> Path:
    """The rebuilt official-layout weights, imported by the CLI as a user would."""
    tmp = tmp_path_factory.mktemp("official")
    weights = tmp / "STM_weights.pth"
    subprocess.run([sys.executable, str(official_dir / "make_weights.py"), str(weights)], check=True)
    out = tmp / "models" / "official" / "model.pt"
    assert stm(["import-official", str(weights), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def expected(official_dir: Path) -> np.ndarray:
    return np.load(official_dir / "expected.npz")["probs"]  # 10 x 3 x 150 x 270


def run_official_clip(network: STMNetwork, official_dir: Path, frames: int = FRAMES, **options) -> list[np.ndarray]:
    core = InferenceCore(network, "every:5", device="cpu", **options)
    mask = torch.from_numpy(read_index_mask(official_dir / "input" / "00000-mask.png").astype(np.int64))
    return [core.step(read_frame(official_dir / "input" / f"{t:05d}.png"), mask if t == 0 else None).numpy()
            for t in range(frames)]


@pytest.mark.slow
def test_imported_weights_match_the_official_implementation(imported: Path, official_dir: Path, expected):
    network = load_checkpoint(imported)
    assert network.config.backbone == "resnet50" and network.config.norm == "frozen_bn"
    probs = run_official_clip(network, official_dir)
    for t, p in enumerate(probs):
        assert p.shape == expected[t].shape
        err = float(np.abs(p - expected[t]).max())
        assert err <= 1e-4, f"frame {t}: max abs difference {err:.2e} from the official implementation"


@pytest.mark.slow
def test_the_fast_path_runs_by_default_and_matches(imported: Path, official_dir: Path, expected):
    """InferenceCore runs a fused copy (BatchNorm folded, Winograd convs) unless told not to; both
    paths match the official outputs, and they are different computations (not bit-identical)."""
    network = load_checkpoint(imported)
    core = InferenceCore(network, "every:5", device="cpu")
    kinds = {type(m).__name__ for m in core.network.modules()}
    assert core.network is not network and core.network.inference_only
    assert "FrozenBatchNorm2d" not in kinds and "WinogradConv2d" in kinds
    fast, plain = run_official_clip(network, official_dir, frames=6), run_official_clip(network, official_dir, 6, fast=False)
    for t in range(6):
        assert np.abs(fast[t] - expected[t]).max() <= 1e-4 and np.abs(plain[t] - expected[t]).max() <= 1e-4
    assert not np.array_equal(fast[1], plain[1])


@pytest.mark.slow
def test_each_official_convention_is_needed(imported: Path, official_dir: Path, expected, monkeypatch):
    """Undo one convention at a time: frame 1 moves far beyond the 1e-4 tolerance."""

    def frame1_error(network: STMNetwork) -> float:
        return float(np.abs(run_official_clip(network, official_dir, frames=2)[1] - expected[1]).max())

    network = load_checkpoint(imported)
    w = network.decoder.compress.weight.data
    half = w.shape[1] // 2
    swapped = load_checkpoint(imported)
    swapped.decoder.compress.weight.data = torch.cat([w[:, half:], w[:, :half]], dim=1)
    assert frame1_error(swapped) > 1e-3, "decoder input order [read, value] vs [value, read] not tested"

    def reflect_pad(x, stride=16):
        h, wd = x.shape[-2:]
        ph, pw = (-h) % stride, (-wd) % stride
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        return F.pad(x, pad, mode="reflect"), pad

    with monkeypatch.context() as m:
        m.setattr(inference, "pad_to_stride", reflect_pad)
        assert frame1_error(network) > 1e-3, "zero vs reflection padding not tested"

    predict = InferenceCore._predict

    def aggregated_twice(self, image, pad):
        probs = predict(self, image, pad)
        return None if probs is None else soft_aggregate(probs[None, 1:])[0].softmax(dim=0)

    with monkeypatch.context() as m:
        m.setattr(InferenceCore, "_predict", aggregated_twice)
        assert frame1_error(network) > 1e-3, "a second soft aggregation not tested"


@pytest.mark.slow
def test_stm_segment_equals_the_official_argmax(imported: Path, official_dir: Path, expected, tmp_path: Path):
    frames, masks, out = tmp_path / "frames", tmp_path / "masks", tmp_path / "out"
    frames.mkdir()
    masks.mkdir()
    for t in range(FRAMES):
        (frames / f"{t:05d}.png").symlink_to(official_dir / "input" / f"{t:05d}.png")
    (masks / "00000.png").symlink_to(official_dir / "input" / "00000-mask.png")
    assert stm(["segment", "--checkpoint", str(imported), "--frames", str(frames), "--masks", str(masks),
                "--out", str(out), "--memory", "every:5", "--device", "cpu"]) == 0
    decided = 0
    for t in range(FRAMES):
        ours = read_index_mask(out / f"{t:05d}.png")
        top2 = np.sort(expected[t], axis=0)[-2:]
        clear = (top2[1] - top2[0]) > 1e-3  # elsewhere the untrained weights give a tie
        official = expected[t].argmax(axis=0)
        assert np.array_equal(ours[clear], official[clear]), f"frame {t}"
        decided += int(clear.sum())
    assert decided > 0.05 * FRAMES * ours.size  # the comparison covers real pixels, not only ties


# --- the import's contract, on self-made files (no ../shared needed) -------------------------------


@pytest.fixture(scope="module")
def official_layout() -> dict[str, torch.Tensor]:
    """A random network written in the official release's layout (module. prefix, [read, value])."""
    torch.manual_seed(0)
    net = STMNetwork(OFFICIAL_CONFIG)
    state: dict[str, torch.Tensor] = {}
    for encoder in ("Encoder_M", "Encoder_Q"):
        state[f"module.{encoder}.mean"] = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        state[f"module.{encoder}.std"] = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for name, tensor in net.state_dict().items():
        t = tensor.clone()
        if name == "decoder.compress.weight":
            half = t.shape[1] // 2
            t = torch.cat([t[:, half:], t[:, :half]], dim=1)
        state[_official_name(name)] = t
        if name.endswith("running_var"):
            state[_official_name(name).replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    state["_ours"] = net  # type: ignore[assignment]  # popped by the tests
    return state


def _save(state: dict, path: Path) -> Path:
    torch.save({k: v for k, v in state.items() if k != "_ours"}, path)
    return path


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_import_round_trips_with_or_without_module_prefix(official_layout, tmp_path: Path, prefix: str):
    state = {k.replace("module.", prefix, 1): v for k, v in official_layout.items()}
    out = tmp_path / "model.pt"
    assert stm(["import-official", str(_save(state, tmp_path / "w.pth")), "--out", str(out)]) == 0
    payload = torch.load(out, weights_only=True)  # a normal, weights-only-safe project checkpoint
    assert payload["model_config"]["backbone"] == "resnet50"
    ours = official_layout["_ours"].state_dict()
    loaded = load_checkpoint(out).state_dict()
    assert loaded.keys() == ours.keys()
    assert all(torch.equal(loaded[k], ours[k]) for k in ours)


def _corrupt(official_layout: dict, case: str) -> dict:
    state = {k: v for k, v in official_layout.items() if k != "_ours"}
    if case == "missing":
        del state["module.Decoder.RF2.ResMM.conv2.bias"]
    elif case == "unexpected":
        state["module.Decoder.RF1.convFS.weight"] = torch.zeros(1)
    elif case == "shape":
        state["module.KV_M_r4.Key.weight"] = torch.zeros(64, 1024, 3, 3)
    return state


@pytest.mark.parametrize("case, message", [
    ("missing", "missing key 'module.Decoder.RF2.ResMM.conv2.bias'"),
    ("unexpected", "unexpected key 'module.Decoder.RF1.convFS.weight'"),
    ("shape", "key 'module.KV_M_r4.Key.weight' has shape [64, 1024, 3, 3]"),
    ("resnet", "unexpected key 'conv1.weight'"),
    ("truncated", "not a readable torch file"),
    ("project", "already a project checkpoint"),
])
def test_bad_weight_files_are_named_errors_with_no_output(official_layout, tmp_path: Path, capsys, case, message):
    src = tmp_path / "bad.pth"
    if case == "resnet":
        from torchvision.models import resnet18

        torch.save(resnet18().state_dict(), src)
    elif case == "truncated":
        _save(official_layout, tmp_path / "full.pth")
        src.write_bytes((tmp_path / "full.pth").read_bytes()[:1_000_000])
    elif case == "project":
        good = tmp_path / "good.pt"
        assert stm(["import-official", str(_save(official_layout, tmp_path / "w.pth")), "--out", str(good)]) == 0
        src = good
        capsys.readouterr()
    else:
        _save(_corrupt(official_layout, case), src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert stm(["import-official", str(src), "--out", str(out_dir / "model.pt")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(src) in err
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == []  # no output, no temp file


def test_import_refuses_a_missing_file(tmp_path: Path, capsys):
    assert stm(["import-official", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "m.pt")]) == 2
    assert "nope.pth: file not found" in capsys.readouterr().err
