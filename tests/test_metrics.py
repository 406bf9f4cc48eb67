"""DAVIS J/F metric: official fixtures, empty cases, mask reading, input errors, `stm score`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation
from skimage.morphology import disk

from stm_core.scoring.folders import evaluate_folder, score_folders
from stm_core.scoring.masks import MetricError, read_index_mask
from stm_core.scoring.measures import (
    bound_pixels,
    boundary_f,
    decay_bins,
    frame_scores,
    jaccard,
    seg2bmap,
    statistics,
)
from stm_core.scoring.sequences import KEYS, evaluate_sequence, score_objects, score_sequences, summarize

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"
FIXTURES = DATA / "metric-fixtures"
TOL = 1e-6


def fixture_case(name: str) -> tuple[dict, Path, Path]:
    """(expected.json, ground-truth sequence dir, prediction sequence dir) of one fixture."""
    root = FIXTURES / name
    if not (root / "expected.json").is_file():
        pytest.skip(f"metric fixture {root} not available (needs ../shared/data)")
    expected = json.loads((root / "expected.json").read_text())
    seq = expected["sequence"]
    gt = root / "gt" / seq
    if not gt.is_dir():  # single-object: ground truth is the davis-sample annotation (see its "note")
        gt = DATA / "davis-sample" / "Annotations" / "480p" / seq
    if not gt.is_dir():
        pytest.skip(f"ground truth {gt} for fixture {name} not available")
    return expected, gt, root / "pred" / seq


def save_png(path: Path, mask: np.ndarray, palette: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8))
    if palette:
        im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [255] * (256 * 3 - 12))
    im.save(path)


def blob_sequence(n: int = 5, h: int = 40, w: int = 60, ids=(1, 2)) -> list[np.ndarray]:
    """Small synthetic index masks: one moving rectangle per object."""
    frames = []
    for t in range(n):
        m = np.zeros((h, w), np.uint8)
        for i, k in enumerate(ids):
            m[5 + 10 * i: 12 + 10 * i, 5 + 3 * t + 20 * i: 20 + 3 * t + 20 * i] = k
        frames.append(m)
    return frames


def write_sequence(root: Path, name: str, frames: list[np.ndarray]) -> Path:
    for t, m in enumerate(frames):
        save_png(root / name / f"{t:05d}.png", m)
    return root / name


# ----------------------------------------------------------------------------- official fixtures

@pytest.mark.parametrize("name", ["single-object", "multi-object"])
def test_fixture_per_frame_object_sequence(name):
    expected, gt_dir, pred_dir = fixture_case(name)
    seq = expected["sequence"]
    scores = evaluate_folder(gt_dir, pred_dir, seq)
    per_frame = scores.per_frame()
    assert sorted(per_frame) == sorted(expected["per_frame"])
    for key, exp in expected["per_frame"].items():
        assert per_frame[key]["frames"] == exp["frames"]
        np.testing.assert_allclose(per_frame[key]["J"], exp["J"], rtol=0, atol=TOL, err_msg=f"{key} J")
        np.testing.assert_allclose(per_frame[key]["F"], exp["F"], rtol=0, atol=TOL, err_msg=f"{key} F")
    objects = score_objects(scores)
    assert sorted(objects) == sorted(expected["per_object"])
    for key, exp in expected["per_object"].items():
        for metric, value in exp.items():
            assert objects[key][metric] == pytest.approx(value, abs=TOL), f"{key} {metric}"
    summary = summarize([scores])
    exp_seq = expected["per_sequence"]
    assert exp_seq["num_objects"] == len(scores.object_ids)
    assert exp_seq["num_frames_scored"] == len(scores.frames)
    for block in (summary["sequences"][seq], summary):  # one sequence: dataset == sequence
        for metric in ("J-Mean", "F-Mean", "J&F-Mean"):
            assert block[metric] == pytest.approx(exp_seq[metric], abs=TOL), metric


def test_fixtures_dataset_mean_is_over_all_objects(tmp_path):
    cases = [fixture_case(n) for n in ("single-object", "multi-object")]
    gt_root, pred_root = tmp_path / "gt", tmp_path / "pred"
    for expected, gt_dir, pred_dir in cases:  # the DAVIS layout score_folders expects
        shutil.copytree(gt_dir, gt_root / expected["sequence"])
        shutil.copytree(pred_dir, pred_root / expected["sequence"])
    summary = score_folders(gt_root, pred_root)
    objects = {k: v for expected, _, _ in cases for k, v in expected["per_object"].items()}
    assert sorted(summary["objects"]) == sorted(objects)
    for metric in ("J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"):
        want = np.mean([o[metric] for o in objects.values()])  # 4 objects, not 2 sequences
        assert summary[metric] == pytest.approx(want, abs=TOL), metric
    assert summary["J&F-Mean"] == pytest.approx((summary["J-Mean"] + summary["F-Mean"]) / 2, abs=1e-12)
    for expected, _, _ in cases:
        got = summary["sequences"][expected["sequence"]]
        assert got["J&F-Mean"] == pytest.approx(expected["per_sequence"]["J&F-Mean"], abs=TOL)
    assert set(summary) == {*KEYS, "sequences", "objects"}
    # --sequences picks a subset
    only = score_folders(gt_root, pred_root, sequences=["car-shadow"])
    assert list(only["sequences"]) == ["car-shadow"]


def test_in_memory_equals_folders_and_is_fast():
    expected, gt_dir, pred_dir = fixture_case("single-object")
    gt = [read_index_mask(p) for p in sorted(gt_dir.glob("*.png"))]
    pred = [read_index_mask(p) for p in sorted(pred_dir.glob("*.png"))]
    assert len(gt) == 40 and gt[0].shape == (480, 854)
    start = time.perf_counter()
    scores = evaluate_sequence(gt, pred, name="car-shadow")
    elapsed = time.perf_counter() - start
    np.testing.assert_allclose(scores.J[0], expected["per_frame"]["car-shadow_1"]["J"], atol=TOL)
    np.testing.assert_allclose(scores.F[0], expected["per_frame"]["car-shadow_1"]["F"], atol=TOL)
    assert scores.frames == expected["per_frame"]["car-shadow_1"]["frames"]  # 00000.. names by default
    assert elapsed < 3.0, f"40 frames of 854x480 took {elapsed:.2f}s"


# ----------------------------------------------------------------------------- definitions

def reference_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = 0.008) -> float:
    """The official f_measure written plainly: full-image disk dilation, no crops, no k-d tree."""
    r = bound_pixels(*gt.shape, bound_th)
    gb, fb = seg2bmap(gt), seg2bmap(pred)
    gt_dil, fg_dil = binary_dilation(gb, disk(r)), binary_dilation(fb, disk(r))  # official: cv2.dilate
    n_fg, n_gt = fb.sum(), gb.sum()
    if n_fg == 0 and n_gt > 0:
        p, rc = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        p, rc = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        p, rc = 1.0, 1.0
    else:
        p, rc = (fb & gt_dil).sum() / n_fg, (gb & fg_dil).sum() / n_gt
    return 0.0 if p + rc == 0 else 2 * p * rc / (p + rc)


@pytest.mark.parametrize("bound_th", [0.008, 0.05, 3])
def test_boundary_f_equals_dilation_reference(bound_th):
    rng = np.random.default_rng(0)
    for _ in range(25):
        h, w = rng.integers(8, 70, size=2)
        gt = rng.random((h, w)) < 0.5
        pred = gt.copy()
        y, x = rng.integers(0, h), rng.integers(0, w)
        pred[y: y + rng.integers(1, 20), x: x + rng.integers(1, 20)] ^= True
        if rng.random() < 0.3:  # rectangles touching the borders too
            gt = np.zeros((h, w), bool)
            gt[rng.integers(0, h):, : rng.integers(1, w + 1)] = True
        got = boundary_f(gt, pred, bound_th)
        assert got == pytest.approx(reference_f(gt, pred, bound_th), abs=1e-12)
        j, f = frame_scores(gt.astype(np.uint8), pred.astype(np.uint8), [1], bound_th)
        assert f[0] == pytest.approx(got, abs=1e-12)
        assert j[0] == pytest.approx(jaccard(gt, pred), abs=1e-12)


def test_seg2bmap_small_example():
    seg = np.zeros((4, 5), bool)
    seg[1:3, 1:3] = True
    want = np.array([[1, 1, 1, 0, 0],
                     [1, 0, 1, 0, 0],
                     [1, 1, 1, 0, 0],
                     [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(seg2bmap(seg), want)
    assert not seg2bmap(np.ones((6, 7), bool)).any()  # a full mask has no boundary


def test_empty_cases():
    empty = np.zeros((2, 30, 40), bool)
    full = np.ones((30, 40), bool)
    obj = np.zeros((30, 40), bool)
    obj[5:15, 10:20] = True
    # both empty: J = 1 and F = 1
    assert jaccard(empty, empty).tolist() == [1.0, 1.0]
    assert boundary_f(empty, empty).tolist() == [1.0, 1.0]
    # one empty: J = 0, F = 0 (either way round)
    assert jaccard(obj, empty[0]) == 0.0 and boundary_f(obj, empty[0]) == 0.0
    assert boundary_f(empty[0], obj) == 0.0
    # a full-image mask has no boundary pixels: against itself F = 1, against an object F = 0
    assert boundary_f(full, full) == 1.0 and boundary_f(full, obj) == 0.0
    assert boundary_f(obj, obj) == 1.0 and jaccard(obj, obj) == 1.0
    # in a sequence: an object absent from both gt and prediction on a frame scores 1 there
    gt = blob_sequence(n=4)
    gt[2][gt[2] == 2] = 0
    pred = [g.copy() for g in gt]
    scores = evaluate_sequence(gt, pred)
    assert scores.object_ids == [1, 2]
    np.testing.assert_array_equal(scores.J, 1.0)
    np.testing.assert_array_equal(scores.F, 1.0)
    # object 2 missing from the prediction everywhere: 0 where the gt has it, 1 where neither has
    pred = [np.where(g == 2, 0, g) for g in gt]
    scores = evaluate_sequence(gt, pred)
    assert scores.J[1].tolist() == [0.0, 1.0] and scores.F[1].tolist() == [0.0, 1.0]


def test_statistics_recall_and_decay_bins():
    # 10 scored frames: official bin edges round(linspace(1, 10, 5)) - 1 = [0, 2, 5, 7, 9], inclusive
    assert [(b.start, b.stop) for b in decay_bins(10)] == [(0, 3), (2, 6), (5, 8), (7, 10)]
    values = np.array([1.0, 0.9, 0.8, 0.5, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    mean, recall, decay = statistics(values)
    assert mean == pytest.approx(values.mean())
    assert recall == pytest.approx(0.4)  # strictly above 0.5: 1.0, 0.9, 0.8, 0.6
    assert decay == pytest.approx(np.mean([1.0, 0.9, 0.8]) - np.mean([0.3, 0.2, 0.1]))
    # NaN frames: left out of the means, counted as not recalled
    mean, recall, _ = statistics(np.array([1.0, np.nan, 0.0, 1.0]))
    assert mean == pytest.approx(2 / 3) and recall == pytest.approx(0.5)


# ----------------------------------------------------------------------------- reading masks

def test_read_index_mask_palette_binary255_and_rgb(tmp_path):
    ids = np.array([[0, 1, 2], [3, 0, 1]], np.uint8)
    save_png(tmp_path / "p.png", ids)
    assert Image.open(tmp_path / "p.png").mode == "P"
    got = read_index_mask(tmp_path / "p.png")
    assert got.dtype == np.uint8 and got.shape == (2, 3)
    np.testing.assert_array_equal(got, ids)
    binary = np.array([[0, 255, 255], [0, 0, 255]], np.uint8)
    save_png(tmp_path / "l.png", binary, palette=False)  # DAVIS-2016 style greyscale 0/255
    save_png(tmp_path / "p255.png", binary)  # and as a palette image
    for name in ("l.png", "p255.png"):
        np.testing.assert_array_equal(read_index_mask(tmp_path / name), binary // 255)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(MetricError, match=r"rgb\.png.*palette"):
        read_index_mask(tmp_path / "rgb.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(MetricError, match=r"broken\.png"):
        read_index_mask(tmp_path / "broken.png")


def test_binary255_sequence_scores_as_object_1(tmp_path):
    gt = [(m > 0).astype(np.uint8) * 255 for m in blob_sequence(ids=(1,))]
    pred = [(m > 0).astype(np.uint8) for m in blob_sequence(ids=(1,))]
    scores = evaluate_sequence(gt, pred, name="bin")  # in memory: 0/255 gt against 0/1 prediction
    assert scores.object_ids == [1] and np.all(scores.J == 1.0) and np.all(scores.F == 1.0)
    for t, (g, p) in enumerate(zip(gt, pred)):  # on disk: greyscale 0/255 files on both sides
        save_png(tmp_path / "gt" / "bin" / f"{t:05d}.png", g, palette=False)
        save_png(tmp_path / "pred" / "bin" / f"{t:05d}.png", p * 255, palette=False)
    summary = score_folders(tmp_path / "gt", tmp_path / "pred")
    assert list(summary["objects"]) == ["bin_1"] and summary["J&F-Mean"] == 1.0


# ----------------------------------------------------------------------------- input errors

@pytest.fixture
def two_dirs(tmp_path):
    frames = blob_sequence(n=5)
    write_sequence(tmp_path / "gt", "blobs", frames)
    write_sequence(tmp_path / "pred", "blobs", frames)
    return tmp_path / "gt", tmp_path / "pred"


def test_perfect_prediction_scores_one(two_dirs):
    summary = score_folders(*two_dirs)
    assert all(summary[k] == 1.0 for k in KEYS if "Decay" not in k)
    assert summary["J-Decay"] == 0.0 and sorted(summary["objects"]) == ["blobs_1", "blobs_2"]
    frames = blob_sequence(n=5)
    assert score_sequences({"blobs": frames}, {"blobs": [None, *frames[1:]]}) == summary  # in memory
    with pytest.raises(MetricError, match="no prediction for sequence"):
        score_sequences({"blobs": frames}, {})


def test_missing_frame_is_an_error_naming_the_file(two_dirs):
    gt_dir, pred_dir = two_dirs
    (pred_dir / "blobs" / "00003.png").unlink()
    with pytest.raises(MetricError, match=r"blobs[/\\]00003\.png.*missing"):
        score_folders(gt_dir, pred_dir)
    # in memory: a None (or a short list) is an error too
    gt = blob_sequence(n=5)
    with pytest.raises(MetricError, match=r"seq/00002.*missing"):
        evaluate_sequence(gt, [gt[0], gt[1], None, gt[3], gt[4]], name="seq")
    with pytest.raises(MetricError, match="4 predicted frames for 5"):
        evaluate_sequence(gt, gt[:4])
    # a missing sequence folder too
    shutil.rmtree(pred_dir / "blobs")
    with pytest.raises(MetricError, match=r"blobs.*missing"):
        score_folders(gt_dir, pred_dir)


def test_size_mismatch_is_an_error_naming_the_file(two_dirs):
    gt_dir, pred_dir = two_dirs
    save_png(pred_dir / "blobs" / "00002.png", np.zeros((20, 30), np.uint8))
    with pytest.raises(MetricError, match=r"blobs[/\\]00002\.png.*30x20.*60x40"):
        score_folders(gt_dir, pred_dir)


def test_unknown_object_id_is_an_error_naming_the_file(two_dirs):
    gt_dir, pred_dir = two_dirs
    bad = blob_sequence(n=5)[4]
    bad[0, 0] = 7
    save_png(pred_dir / "blobs" / "00004.png", bad)  # the last frame: not scored, still checked
    with pytest.raises(MetricError, match=r"blobs[/\\]00004\.png.*unknown object id.*\[7\]"):
        score_folders(gt_dir, pred_dir)
    gt = blob_sequence(n=5, ids=(1, 3))  # non-contiguous ids: 2 is unknown although below the max
    pred = [g.copy() for g in gt]
    pred[1][0, 0] = 2
    with pytest.raises(MetricError, match=r"s/00001.*\[2\]"):
        evaluate_sequence(gt, pred, name="s")


def test_too_few_frames_and_no_objects_are_errors():
    gt = blob_sequence(n=2)
    with pytest.raises(MetricError, match="at least 3"):
        evaluate_sequence(gt, gt)
    empty = [np.zeros((8, 8), np.uint8)] * 3
    with pytest.raises(MetricError, match="no object"):
        evaluate_sequence(empty, empty)


# ----------------------------------------------------------------------------- CLI

def test_cli_writes_json_and_prints_table(two_dirs, tmp_path, capsys):
    from pipeline.cli import main

    gt_dir, pred_dir = two_dirs
    out = tmp_path / "out" / "scores.json"
    assert main(["score", "--gt", str(gt_dir), "--pred", str(pred_dir), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "J&F-Mean" in printed and "blobs" in printed and "overall" in printed
    data = json.loads(out.read_text())
    assert set(data) == {*KEYS, "sequences", "objects"}
    assert set(data["sequences"]["blobs"]) == set(KEYS)
    assert set(data["objects"]) == {"blobs_1", "blobs_2"} and set(data["objects"]["blobs_1"]) == set(KEYS)
    assert [p.name for p in out.parent.iterdir()] == ["scores.json"]  # no temp file left behind


def test_cli_bad_input_exits_nonzero_without_traceback(two_dirs, tmp_path, capsys):
    from pipeline.cli import main

    gt_dir, pred_dir = two_dirs
    (pred_dir / "blobs" / "00001.png").unlink()
    out = tmp_path / "scores.json"
    assert main(["score", "--gt", str(gt_dir), "--pred", str(pred_dir), "--json", str(out)]) != 0
    err = capsys.readouterr().err
    assert "00001.png" in err and "Traceback" not in err
    assert not out.exists()


def test_metrics_import_needs_no_ray():
    code = "import sys, stm_core.scoring.cli; assert 'ray' not in sys.modules and 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
