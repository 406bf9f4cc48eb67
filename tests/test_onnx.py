"""`stm export` and the onnx runtime: the same masks and probabilities as PyTorch, and named errors.

Parity runs InferenceCore twice over the same frames, once with the torch network (fast path on)
and once with the exported graphs on onnxruntime, for STM's every:5 and fifo:8 and STRMN's
recurrent:5:C, with 1 and 3 objects, on long enough clips that every memory grows past its first
size. Decided pixels: where torch's two best probabilities are more than 1e-3 apart (elsewhere an
untrained network's tie can go either way).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install '.[onnx]')")

from pipeline.cli import main as stm  # noqa: E402
from stm_core.data.io import read_frame, read_index_mask  # noqa: E402
from stm_core.data.video import read_davis  # noqa: E402
from stm_core.inference import InferenceCore  # noqa: E402
from stm_core.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from stm_core.model.network import ModelConfig, STMNetwork  # noqa: E402
from stm_core.onnx_runtime import OnnxGraphError, OnnxNetwork  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = (REPO / ".." / "shared" / "official-stm").resolve()
SIZE = (120, 216)  # DAVIS frames resized: 8 x 14 memory locations per frame at 1/16
FRAMES = 14  # every:5 holds 0, 5, 10 + previous; fifo:8 wraps; recurrent:5 fuses from frame 5 on


def export(checkpoint: Path, out: Path) -> Path:
    assert stm(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Untrained ResNet-18 STM and STRMN checkpoints and their exports: kind -> (checkpoint, graphs)."""
    tmp = tmp_path_factory.mktemp("onnx-models")
    out = {}
    for kind in ("stm", "strmn"):
        torch.manual_seed(1)
        ckpt = tmp / f"{kind}.pt"
        save_checkpoint(ckpt, STMNetwork(ModelConfig(kind=kind)))
        out[kind] = (ckpt, export(ckpt, tmp / f"{kind}-onnx"))
    return out


@pytest.fixture(scope="module")
def car_clip(davis_sample: Path) -> tuple[list[torch.Tensor], torch.Tensor]:
    """car-shadow's first FRAMES frames at SIZE and its first mask (the car, id 1)."""
    (video,) = read_davis(davis_sample, split=None, sequences=["car-shadow"])
    frames = [F.interpolate(video.load_frame(t)[None], size=SIZE, mode="bilinear", align_corners=False)[0]
              for t in range(FRAMES)]
    mask = video.load_mask_tensor(0)
    assert mask is not None
    mask = F.interpolate(mask[None, None].float(), size=SIZE, mode="nearest")[0, 0].long()
    return frames, mask


def split_in_three(mask: torch.Tensor) -> torch.Tensor:
    """The object's pixels as 3 objects: its box cut into three column bands (ids 1, 2, 3)."""
    cols = torch.nonzero(mask > 0)[:, 1]
    edges = torch.linspace(float(cols.min()), float(cols.max()) + 1, 4)
    band = torch.bucketize(torch.arange(mask.shape[1]).float(), edges[1:3], right=True) + 1
    return torch.where(mask > 0, band[None, :].expand_as(mask), torch.zeros_like(mask))


def run_both(torch_net, onnx_net, policy: str, frames, masks: dict[int, torch.Tensor]):
    """-> torch probs, onnx probs (per frame), and the onnx core's memory sizes after each frame."""
    cores = InferenceCore(torch_net, policy, device="cpu"), InferenceCore(onnx_net, policy)
    probs: tuple[list, list] = ([], [])
    sizes = []
    for t, frame in enumerate(frames):
        for core, out in zip(cores, probs):
            out.append(core.step(frame, masks.get(t)).numpy())
        sizes.append(max(g.memory.size for g in cores[1].groups))
    for core in cores:
        core.close()
    return probs[0], probs[1], sizes


def assert_same(ours: list[np.ndarray], theirs: list[np.ndarray], what: str) -> None:
    decided = agree = 0
    for t, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape
        err = float(np.abs(a - b).max())
        assert err <= 1e-4, f"{what}, frame {t}: probabilities differ by {err:.2e}"
        top2 = np.sort(a, axis=0)[-2:]
        clear = (top2[1] - top2[0]) > 1e-3
        decided += int(clear.sum())
        agree += int((a.argmax(0) == b.argmax(0))[clear].sum())
    assert decided > 0.05 * len(ours) * ours[0][0].size, f"{what}: too few decided pixels to compare"
    assert agree >= 0.999 * decided, f"{what}: masks agree on {agree} of {decided} decided pixels"


@pytest.mark.parametrize("objects", [1, 3])
@pytest.mark.parametrize("policy", ["every:5", "fifo:8", "recurrent:5:C"])
def test_onnxruntime_gives_pytorchs_masks_on_davis(models, car_clip, policy: str, objects: int, one_thread):
    kind = "strmn" if policy.startswith("recurrent") else "stm"
    ckpt, graphs = models[kind]
    frames, mask = car_clip
    mask = mask if objects == 1 else split_in_three(mask)
    assert len(mask.unique()) == 1 + objects
    ours, theirs, sizes = run_both(load_checkpoint(ckpt), OnnxNetwork(graphs, ckpt), policy, frames, {0: mask})
    assert_same(ours, theirs, f"{policy}, {objects} object(s)")
    assert ours[-1].shape[0] == 1 + objects
    grown = {"every:5": 4, "fifo:8": 8, "recurrent:5:C": 5}[policy]  # 0, 5, 10 + the previous frame
    assert sizes[0] == 1 and max(sizes) == grown, sizes  # the read saw every memory length up to it


def test_objects_that_enter_mid_video_match(models, davis_sample: Path, one_thread):
    """judo: objects 2 and 3 are annotated at frames 5 and 8, each a group with a memory of its own."""
    (video,) = read_davis(davis_sample, split=None, sequences=["judo"])
    ckpt, graphs = models["stm"]
    frames = [F.interpolate(video.load_frame(t)[None], size=SIZE, mode="bilinear")[0] for t in range(12)]
    masks = {}
    for t in (0, 5, 8):
        m = video.load_mask_tensor(t)
        assert m is not None
        masks[t] = F.interpolate(m[None, None].float(), size=SIZE, mode="nearest")[0, 0].long()
    ours, theirs, _ = run_both(load_checkpoint(ckpt), OnnxNetwork(graphs, ckpt), "every:5", frames, masks)
    assert ours[-1].shape[0] == 4  # background and three objects, from three groups
    assert_same(ours, theirs, "judo")


def test_the_manifest_names_the_opset_model_and_checkpoint(models):
    import onnx

    ckpt, graphs = models["strmn"]
    manifest = json.loads((graphs / "manifest.json").read_text())
    assert manifest["opset"] == 17 and manifest["precision"] == "fp32"
    assert manifest["model"]["kind"] == "strmn" and manifest["model"]["config"]["backbone"] == "resnet18"
    assert set(manifest["graphs"]) == {"query_encoder", "memory_encoder", "read", "decoder", "aggregate",
                                       "template_key_value", "fusion"}
    from stm_core.onnx_export import file_sha256

    assert manifest["checkpoint"]["sha256"] == file_sha256(ckpt)
    for name, entry in manifest["graphs"].items():
        model = onnx.load(str(graphs / entry["file"]))
        onnx.checker.check_model(model)
        assert model.opset_import[0].version == 17
        assert [i.name for i in model.graph.input] == entry["inputs"], name
    stm_graphs = json.loads((models["stm"][1] / "manifest.json").read_text())["graphs"]
    assert "fusion" not in stm_graphs


def test_a_graph_from_another_model_is_named(models, tmp_path: Path):
    ckpt, graphs = models["stm"]
    mixed = tmp_path / "mixed"
    shutil.copytree(graphs, mixed)
    shutil.copy(models["strmn"][1] / "read.onnx", mixed / "read.onnx")
    with pytest.raises(OnnxGraphError, match=rf"{mixed / 'read.onnx'}: graph from another export"):
        OnnxNetwork(mixed, ckpt)
    with pytest.raises(OnnxGraphError, match=r"manifest.json: the graphs were exported from another checkpoint"):
        OnnxNetwork(graphs, models["strmn"][0])
    (mixed / "decoder.onnx").write_bytes(b"not a graph")
    shutil.copy(graphs / "read.onnx", mixed / "read.onnx")
    with pytest.raises(OnnxGraphError, match=rf"{mixed / 'decoder.onnx'}: not a loadable ONNX graph"):
        OnnxNetwork(mixed, ckpt)
    with pytest.raises(OnnxGraphError, match=rf"{tmp_path / 'manifest.json'}: no manifest"):
        OnnxNetwork(tmp_path)


def test_a_bad_checkpoint_is_named_and_nothing_is_written(tmp_path: Path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    assert stm(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not a readable checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_segment_with_the_onnx_runtime_refuses_graphs_of_another_checkpoint(models, tmp_path: Path, capsys):
    frames, masks = tmp_path / "frames", tmp_path / "masks"
    frames.mkdir()
    masks.mkdir()
    image = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    from stm_core.data.io import write_image, write_index_mask

    write_image(frames / "00000.png", image)
    write_index_mask(masks / "00000.png", np.pad(np.ones((20, 20), np.uint8), ((10, 18), (20, 24))))
    code = stm(["segment", "--checkpoint", str(models["stm"][0]), "--frames", str(frames), "--masks", str(masks),
                "--out", str(tmp_path / "out"), "--runtime", "onnx", "--onnx", str(models["strmn"][1]),
                "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{models['strmn'][1] / 'manifest.json'}: the graphs were exported from another checkpoint" in err


def test_stm_core_imports_without_onnx():
    code = ("import sys; sys.modules['onnxruntime'] = None; sys.modules['onnx'] = None\n"
            "import stm_core.inference, stm_core.segment, stm_core.runtimes, stm_core.onnx_runtime\n"
            "from stm_core.onnx_runtime import OnnxGraphError, OnnxNetwork\n"
            "try:\n    OnnxNetwork('.')\nexcept OnnxGraphError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "pip install 'stm-vos[onnx]'" in out


# --- the official-layout weights (ResNet-50, as the release): against torch and the official outputs ---


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[Path, Path]:
    if not (OFFICIAL / "expected.npz").is_file():
        pytest.skip(f"official STM fixture not found at {OFFICIAL} (it ships beside the repo, not in it)")
    tmp = tmp_path_factory.mktemp("official-onnx")
    weights = tmp / "STM_weights.pth"
    subprocess.run([sys.executable, str(OFFICIAL / "make_weights.py"), str(weights)], check=True)
    ckpt = tmp / "model.pt"
    assert stm(["import-official", str(weights), "--out", str(ckpt)]) == 0
    return ckpt, export(ckpt, tmp / "onnx")


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["every:5", "fifo:8"])
def test_official_weights_on_onnxruntime_match_torch_and_the_official_outputs(official, policy: str):
    ckpt, graphs = official
    frames = [read_frame(OFFICIAL / "input" / f"{t:05d}.png") for t in range(10)]
    mask = torch.from_numpy(read_index_mask(OFFICIAL / "input" / "00000-mask.png").astype(np.int64))
    ours, theirs, sizes = run_both(load_checkpoint(ckpt), OnnxNetwork(graphs, ckpt), policy, frames, {0: mask})
    assert_same(ours, theirs, f"official, {policy}")
    assert max(sizes) > sizes[0]
    if policy == "every:5":  # what the official implementation computes (expected.npz)
        expected = np.load(OFFICIAL / "expected.npz")["probs"]
        assert max(float(np.abs(p - e).max()) for p, e in zip(theirs, expected)) <= 1e-4


@pytest.mark.slow
def test_stm_segment_runtime_onnx_writes_the_torch_masks(official, tmp_path: Path):
    ckpt, graphs = official
    frames, masks = tmp_path / "frames", tmp_path / "masks"
    frames.mkdir()
    masks.mkdir()
    for t in range(6):  # the memory grows: frame 0, then the previous frame beside it
        (frames / f"{t:05d}.png").symlink_to(OFFICIAL / "input" / f"{t:05d}.png")
    (masks / "00000.png").symlink_to(OFFICIAL / "input" / "00000-mask.png")
    common = ["--checkpoint", str(ckpt), "--frames", str(frames), "--masks", str(masks), "--memory", "every:5",
              "--device", "cpu"]
    assert stm(["segment", *common, "--out", str(tmp_path / "torch")]) == 0
    assert stm(["segment", *common, "--out", str(tmp_path / "onnx"), "--runtime", "onnx", "--onnx", str(graphs)]) == 0
    differ = total = 0
    for t in range(6):
        a, b = read_index_mask(tmp_path / "torch" / f"{t:05d}.png"), read_index_mask(tmp_path / "onnx" / f"{t:05d}.png")
        differ += int((a != b).sum())
        total += a.size
    assert differ <= 0.001 * total, f"{differ} of {total} pixels differ"


@pytest.mark.slow
def test_many_videos_on_ray_with_the_onnx_runtime(models, tmp_path: Path, ray_2cpu, one_thread):
    """--dataset on a Ray actor with --runtime onnx: the one-video torch masks, and segment.json says onnx."""
    from test_segment_many import builtin_davis

    names = builtin_davis(tmp_path / "davis", videos=2, frames=6, size=64)
    ckpt, graphs = models["stm"]
    out = tmp_path / "out"
    assert stm(["segment", "--checkpoint", str(ckpt), "--dataset", str(tmp_path / "davis"), "--out", str(out),
                "--workers", "1", "--memory", "every:2", "--runtime", "onnx", "--onnx", str(graphs),
                "--device", "cpu"]) == 0
    summary = json.loads((out / "segment.json").read_text())
    assert summary["summary"]["done"] == 2
    from pipeline.segment.listing import dataset_jobs
    from pipeline.segment.sources import load_given
    from pipeline.segment.tree import Inputs, Tree
    from stm_core.data.io import write_index_mask

    root = tmp_path / "davis"
    jobs = {j.name: j for j in dataset_jobs(Tree.scan(root))[0]}
    differ = total = 0
    for name in names:
        assert summary["videos"][name]["settings"]["runtime"] == "onnx"
        given, _ = load_given(jobs[name], Inputs(str(root)), (64, 64))  # the masks the actor started from
        for t, ids in given.items():
            write_index_mask(tmp_path / "given" / name / f"{t:05d}.png", ids.numpy())
        single = tmp_path / "single" / name
        assert stm(["segment", "--checkpoint", str(ckpt), "--frames", str(root / "JPEGImages" / "480p" / name),
                    "--masks", str(tmp_path / "given" / name), "--out", str(single),
                    "--memory", "every:2", "--device", "cpu"]) == 0
        for t in range(6):
            a, b = read_index_mask(out / name / f"{t:05d}.png"), read_index_mask(single / f"{t:05d}.png")
            differ += int((a != b).sum())
            total += a.size
    assert differ <= 0.002 * total, f"{differ} of {total} pixels differ"
