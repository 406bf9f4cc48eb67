"""stm evaluate / stm report: variant parsing and naming, copy-first, the DVC outputs, and end to end
on tiny generated data with a real Ray and a real MLflow store."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.evaluate.outputs import (
    DVC_METRICS,
    METRICS,
    j_per_frame_table,
    metrics_json,
    sequence_table,
    summarize_variant,
    variants_table,
)
from pipeline.evaluate.variants import MemoryParams, parse_variants
from pipeline.evaluate.worker import SequenceResult, copy_first, given_masks
from pipeline.params import ParamsError, section
from stm_core.data.io import index_mask_png, write_image, write_index_mask
from stm_core.scoring.folders import score_folders
from stm_core.scoring.sequences import evaluate_sequence

HAS_STRMN = importlib.util.find_spec("stm_core.model.fusion") is not None and \
    importlib.util.find_spec("stm_core.memory.recurrent") is not None


# ----------------------------------------------------------------------------- variants

def test_default_variants_have_stable_safe_names():
    specs = ["copy-first", "stm:first", "stm:previous", "stm:first+previous", "stm:every", "stm:fifo"]
    names = [v.name for v in parse_variants(specs, MemoryParams(every=5, fifo=8))]
    assert names == ["copy-first", "stm-first", "stm-previous", "stm-first-previous", "stm-every-5", "stm-fifo-8"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)


@pytest.mark.skipif(not HAS_STRMN, reason="STRMN memory (stm_core.memory.recurrent) not there yet")
def test_strmn_expands_rules_with_memory_slots():
    mem = MemoryParams(slots=5, rules=["A", "C"])
    vs = parse_variants(["strmn", "strmn:D", "recurrent:4:B"], mem)
    assert [v.name for v in vs] == ["strmn-recurrent-5-A", "strmn-recurrent-5-C", "strmn-recurrent-5-D",
                                    "strmn-recurrent-4-B"]
    assert [(v.model, v.policy, v.rule, v.size) for v in vs][0] == ("strmn", "recurrent:5:A", "A", 5)


def test_explicit_and_bare_policies():
    vs = parse_variants(["stm:every:10", "fifo:3", "every"], MemoryParams(every=2))
    assert [(v.name, v.model, v.policy) for v in vs] == [
        ("stm-every-10", "stm", "every:10"), ("stm-fifo-3", "stm", "fifo:3"), ("stm-every-2", "stm", "every:2")]


def test_oracle_variants_name_the_model_and_policy_they_shadow():
    vs = parse_variants(["stm:every", "oracle:every", "oracle:stm:previous", "oracle:strmn:C"],
                        MemoryParams(every=5, slots=4))
    assert [(v.name, v.model, v.policy, v.oracle) for v in vs] == [
        ("stm-every-5", "stm", "every:5", False), ("stm-oracle-every-5", "stm", "every:5", True),
        ("stm-oracle-previous", "stm", "previous", True), ("strmn-oracle-recurrent-4-C", "strmn", "recurrent:4:C", True)]


@pytest.mark.parametrize("specs, message", [
    (["stm:every:5", "stm:every"], "gave already"),
    (["oracle:copy-first"], "no memory to hold the ground truth"),
    (["oracle:"], "needs a model's policy"),
    (["oracle:oracle:first"], "needs a model's policy"),
    (["oracle:every", "oracle:stm:every:5"], "gave already"),
    (["stm:bogus"], "unknown memory policy"),
    (["stm"], "needs a memory policy"),
    (["stm:every:0"], "integer >= 1"),
    ([], "no variant"),
])
def test_bad_variants_are_errors_naming_the_spec(specs, message):
    with pytest.raises(ValueError, match=message):
        parse_variants(specs, MemoryParams(every=5))


@pytest.mark.skipif(not HAS_STRMN, reason="STRMN memory not there yet")
def test_recurrent_policy_needs_the_strmn_model():
    with pytest.raises(ValueError, match="needs the STRMN model"):
        parse_variants(["stm:recurrent:3:C"], MemoryParams())


def test_memory_params_unknown_key_and_bad_rule(tmp_path):
    with pytest.raises(ParamsError, match=r"p\.yaml: memory.*unknown key.*'slot'"):
        section({"__file__": "p.yaml", "memory": {"slot": 5}}, "memory", MemoryParams)
    with pytest.raises(ParamsError, match="rules"):
        section({"__file__": "p.yaml", "memory": {"rules": ["E"]}}, "memory", MemoryParams)
    assert section({"memory": {"slots": 5}}, "memory", MemoryParams).slots == 5


def test_repo_params_evaluate_and_memory_sections_parse():
    """The repo's params.yaml (the lead's) must hold sections these stages accept."""
    from pipeline import tracking
    from pipeline.evaluate.stage import EvaluateParams
    from pipeline.params import load_params

    path = Path(__file__).resolve().parents[1] / "params.yaml"
    if not path.is_file():
        pytest.skip("no params.yaml in the repo yet")
    params = load_params(path)
    section(params, "evaluate", EvaluateParams)
    section(params, "mlflow", tracking.MlflowParams)
    memory = section(params, "memory", MemoryParams)
    specs = section(params, "evaluate", EvaluateParams).variants
    if not HAS_STRMN:
        specs = [s for s in specs if not str(s).startswith(("strmn", "recurrent"))]
    assert parse_variants(specs, memory)


# ----------------------------------------------------------------------------- copy-first and inputs

def test_given_masks_keep_only_the_objects_each_frame_introduces():
    gt = {t: np.zeros((4, 4), np.uint8) for t in range(4)}
    for t in range(4):
        gt[t][0, t] = 1
    for t in (2, 3):
        gt[t][3, 3] = 2
    given = given_masks(gt, None)
    assert sorted(given) == [0, 2]
    assert set(np.unique(given[2])) == {0, 2}  # object 1 is tracked, not given again


def test_copy_first_carries_each_annotation_forward():
    first = np.zeros((3, 3), np.uint8)
    first[0, :] = 1
    later = np.zeros((3, 3), np.uint8)
    later[:, 0] = 2  # overlaps object 1 at (0, 0): the newer annotation claims it
    preds = copy_first(5, {0: first, 2: later}, (3, 3))
    assert all((p == first).all() for p in preds[:2])
    for p in preds[2:]:
        assert p[0, 0] == 2 and (p[0, 1:] == 1).all() and (p[1:, 0] == 2).all() and p[2, 2] == 0


# ----------------------------------------------------------------------------- outputs

def _result(variant: str, name: str, gt: list[np.ndarray], pred: list[np.ndarray], seconds: float) -> SequenceResult:
    scores = evaluate_sequence(gt, pred, name=name)
    return SequenceResult(variant, name, [f"{i:05d}" for i in range(len(gt))], [index_mask_png(p) for p in pred],
                          scores, len(gt), seconds, 3 * 2 ** 20, 4, 2 ** 20)


def test_metrics_json_is_two_level_and_matches_the_metric():
    rng = np.random.default_rng(0)
    gt = [(rng.random((16, 16)) > 0.5).astype(np.uint8) for _ in range(5)]
    pred = [g.copy() for g in gt]
    pred[2][:4] = 0
    s = summarize_variant("stm-every-5", [_result("stm-every-5", "a", gt, pred, 0.5)])
    data = metrics_json([s])
    assert list(data) == ["stm-every-5"] and list(data["stm-every-5"]) == list(METRICS)
    assert list(metrics_json([s], DVC_METRICS)["stm-every-5"]) == [
        "JF_mean", "J_mean", "J_recall", "J_decay", "F_mean", "F_recall", "F_decay", "fps", "peak_memory_mb",
        "memory_entries"]
    m = data["stm-every-5"]
    assert all(isinstance(v, float) for v in m.values())
    assert m["JF_mean"] == pytest.approx(s.summary["J&F-Mean"], abs=1e-6)
    assert m["fps"] == pytest.approx(10.0) and m["ms_per_frame"] == pytest.approx(100.0)
    assert m["peak_memory_mb"] == 3.0 and m["memory_entries"] == 4.0 and m["memory_mb"] == 1.0
    json.dumps(data, allow_nan=False)  # strict JSON: no NaN for DVC

    rows = list(csv.DictReader(io.StringIO(variants_table([s]).decode())))
    assert rows[0]["variant"] == "stm-every-5" and float(rows[0]["JF_mean"]) == pytest.approx(m["JF_mean"], abs=1e-5)
    frames = list(csv.DictReader(io.StringIO(j_per_frame_table([s]).decode())))
    assert [int(r["frame"]) for r in frames] == [1, 2, 3]  # first and last frames are not scored
    assert float(frames[1]["stm-every-5"]) < 1.0 == float(frames[0]["stm-every-5"])


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    from pipeline.cli import main

    make_tiny_davis(tmp_path / "bench")
    params = {"evaluate": {"variants": ["copy-first", "stm:every"], "dataset": str(tmp_path / "bench"),
                           "stm_model": str(tmp_path / "nope" / "model.pt")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["evaluate", "--params", str(tmp_path / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope' / 'model.pt'}: checkpoint not found" in err and "stm-every-5" in err


def test_youtube_vos_layout_with_an_object_entering_mid_video(tmp_path):
    """A YouTube-VOS folder (meta.json says where objects start) through one copy-first task."""
    from pipeline.evaluate.stage import EvaluateParams, load_sequences, payload
    from pipeline.evaluate.worker import run_sequence

    davis = tmp_path / "davis"
    make_tiny_davis(davis)
    base = tmp_path / "ytvos" / "train"
    for kind in ("JPEGImages", "Annotations"):
        (base / kind).mkdir(parents=True)
        (davis / kind / "480p" / "seq-b").rename(base / kind / "vid1")
    stems = [f"{t:05d}" for t in range(6)]
    meta = {"videos": {"vid1": {"objects": {"1": {"frames": stems}, "2": {"frames": stems[2:]}}}}}
    (base / "meta.json").write_text(json.dumps(meta))
    [seq] = load_sequences(EvaluateParams(dataset=str(tmp_path / "ytvos"), split="train"))
    assert seq.name == "vid1" and seq.object_frames == {1: 0, 2: 2}
    [copy] = parse_variants(["copy-first"], MemoryParams())
    result = run_sequence(copy, None, payload(seq))
    assert result.scores.object_ids == [1, 2] and len(result.masks) == 6
    assert result.memory_entries == 0 and 0 < result.scores.J.mean() < 1


def test_summary_labels_survive_memory_size_changes():
    from pipeline.evaluate.outputs import short_label, summary_json

    assert [short_label(n) for n in ("copy-first", "stm-first-previous", "stm-every-5", "stm-fifo-8",
                                     "strmn-recurrent-3-C", "strmn-recurrent-i2m-4")] == [
        "copy-first", "first-previous", "every", "fifo", "strmn-C", "strmn-i2m"]
    rng = np.random.default_rng(0)
    gt = [(rng.random((16, 16)) > 0.5).astype(np.uint8) for _ in range(4)]
    two = [summarize_variant(n, [_result(n, "a", gt, gt, 0.5)]) for n in ("stm-every-5", "stm-every-2")]
    summary = summary_json(two)  # two every:N variants: a shared label would hide one, so full names
    assert list(summary["JF"]) == ["stm-every-5", "stm-every-2"] and summary["JF"]["stm-every-5"] == 100.0
    assert summary["FPS"]["stm-every-2"] == pytest.approx(8.0)


def test_report_reads_only_the_evaluation_outputs(tmp_path, capsys):
    """`stm report` from results/evaluation.json + plots/evaluate_variants.csv: no MLflow store, no
    params; a record that names no reachable MLflow run only warns; missing inputs are clear errors."""
    from pipeline.cli import main

    rng = np.random.default_rng(0)
    gt = [(rng.random((16, 16)) > 0.5).astype(np.uint8) for _ in range(4)]
    names = ["copy-first", "stm-every-5"]
    summaries = [summarize_variant(n, [_result(n, "a", gt, gt, 0.5)]) for n in names]
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots/evaluate_variants.csv").write_bytes(variants_table(summaries))
    record = {"parent_run_id": "abc", "tracking_uri": "", "experiment": "x", "dataset": "bench", "split": "val",
              "sequences": ["a"], "training_data": {"stm": "davis videos"},
              "variants": [{"name": "copy-first", "model": "none", "policy": "copy-first"},
                           {"name": "stm-every-5", "model": "stm", "policy": "every:5"}]}
    (tmp_path / "evaluation.json").write_text(json.dumps(record))
    for s in summaries:  # results/<variant>/sequences.csv, beside the record, as `stm evaluate` leaves them
        (tmp_path / s.name).mkdir()
        (tmp_path / s.name / "sequences.csv").write_bytes(sequence_table(s))
    args = ["report", "--evaluation", str(tmp_path / "evaluation.json"), "--variants",
            str(tmp_path / "plots/evaluate_variants.csv"), "--out", str(tmp_path / "r/ablation.md"),
            "--chart", str(tmp_path / "r/ablation.png")]
    assert main(args) == 0
    text = (tmp_path / "r/ablation.md").read_text()
    assert "| Every 5 frames | 100.0 |" in text and "davis videos" in text
    assert "warning: the evaluation record names no MLflow run" in capsys.readouterr().err
    (tmp_path / "stm-every-5" / "sequences.csv").unlink()  # an incomplete results folder is not reported on
    assert main(args) == 2
    assert f"{tmp_path / 'stm-every-5' / 'sequences.csv'}: not found" in capsys.readouterr().err
    (tmp_path / "evaluation.json").unlink()
    assert main(args) == 2
    assert "evaluation.json: not found; run `stm evaluate`" in capsys.readouterr().err


def test_report_tables_follow_the_papers_layout():
    from pipeline.report.paper import STM_DAVIS_ONLY, STM_WITH_YOUTUBE, training_note
    from pipeline.report.rows import Row
    from pipeline.report.tables import stm_table, strmn_table

    def row(name, model, policy, jf, data="synthetic clips from static images + davis videos data/raw/davis"):
        family = policy.split(":")[0]
        rule = policy.split(":")[2] if family == "recurrent" else ""
        metrics = dict.fromkeys(METRICS, 0.5)
        metrics.update(JF_mean=jf, J_mean=jf - 0.01, F_mean=jf + 0.01, ms_per_frame=120.0, memory_entries=3.0)
        return Row(name, model, policy, family, rule, metrics, data if model != "none" else "")

    rows = [row("strmn-recurrent-5-C", "strmn", "recurrent:5:C", 0.7), row("stm-every-5", "stm", "every:5", 0.8),
            row("copy-first", "none", "copy-first", 0.3), row("stm-first", "stm", "first", 0.6),
            row("strmn-recurrent-5-A", "strmn", "recurrent:5:A", 0.65), row("stm-fifo-8", "stm", "fifo:8", 0.75)]
    stm = [line.split(" | ") for line in stm_table(rows)[2:]]
    assert [c[0].strip("| ") for c in stm] == ["Copy first mask (no model)", "First", "Every 5 frames",
                                               "First + latest 7 (FIFO 8)"]
    assert stm[2][1:5] == ["80.0", "79.0", "81.0", "0.120"]
    # Trained on DAVIS only: the published DAVIS-only figure, not Table 5 (+YouTube-VOS).
    assert STM_DAVIS_ONLY in stm_table(rows)[0] and stm[2][-1].startswith("69.2") and stm[1][-1].strip("| ") == ""
    assert "trained with YouTube-VOS (+YV), which this model was not" in training_note(rows)
    official = [row(r.variant, r.model, r.policy, 0.8, "DAVIS-2017 + YouTube-VOS (official STM release)")
                if r.model == "stm" else r for r in rows]
    stm = [line.split(" | ") for line in stm_table(official)[2:]]
    assert STM_WITH_YOUTUBE in stm_table(official)[0] and stm[2][-1].startswith("79.2 / 0.16")
    assert stm[1][-1].startswith("67.0 / 0.06") and "compare directly" in training_note(official)
    strmn = [line.split(" | ") for line in strmn_table(rows)[2:]]
    assert [c[0].strip("| ") for c in strmn] == ["Copy first mask (no model)", "Oldest vs remaining (A)",
                                                 "Least similarity pair (C)"]
    assert strmn[2][1:5] == ["69.0", "71.0", "70.0", "5"] and strmn[2][-1].startswith("76.1 / 81.0 / 78.5")


def test_oracle_rows_sit_beside_their_plain_twin_not_in_the_paper_tables():
    from pipeline.report.rows import Row
    from pipeline.report.tables import oracle_table, stm_table

    def row(name, policy, jf, oracle=False):
        metrics = dict.fromkeys(METRICS, 0.5)
        metrics.update(JF_mean=jf)
        return Row(name, "stm", policy, policy.split(":")[0], "", metrics, "", oracle)

    rows = [row("stm-first", "first", 0.40), row("stm-every-5", "every:5", 0.38),
            row("stm-oracle-every-5", "every:5", 0.52, True), row("stm-oracle-fifo-8", "fifo:8", 0.45, True)]
    assert [line.split(" | ")[0].strip("| ") for line in stm_table(rows)[2:]] == ["First", "Every 5 frames"]
    table = oracle_table(rows)
    assert table[0].startswith("## Memory holding the ground truth")
    body = [line for line in table if line.startswith("| STM")]
    assert body == ["| STM: Every 5 frames | 38.0 | 52.0 | +14.0 |",  # its plain twin was evaluated
                    "| STM: First + latest 7 (FIFO 8) | – | 45.0 |  |"]  # none to compare with: no gain
    assert oracle_table(rows[:2]) == []


def test_per_sequence_table_names_policies_whose_difference_changes_sign(tmp_path):
    from pipeline.report.per_sequence import read_sequence_scores
    from pipeline.report.tables import per_sequence_table

    rows = {"stm-first": [("a", 0.50), ("b", 0.70), ("c", 0.10)],
            "stm-every-5": [("a", 0.56), ("b", 0.61), ("c", 0.10)],  # up on a, down on b: no ranking
            "stm-fifo-8": [("a", 0.55), ("b", 0.75), ("c", 0.20)]}  # up everywhere: a ranking
    for variant, per in rows.items():
        (tmp_path / variant).mkdir()
        text = "sequence,objects,JF_mean\n" + "".join(f"{s},1,{v}\n" for s, v in per)
        (tmp_path / variant / "sequences.csv").write_text(text)
    scores = read_sequence_scores(tmp_path, list(rows))
    labels = [("stm-first", "First"), ("stm-every-5", "Every 5 frames"), ("stm-fifo-8", "FIFO 8")]
    table, notes = per_sequence_table(labels, scores, "stm-first", ["a", "b", "c"])
    assert table[2] == "| First | 50.0 | 70.0 | 10.0 |  |  |"
    assert table[3] == "| Every 5 frames | 56.0 | 61.0 | 10.0 | +6.0 / -9.0 / +0.0 | 1 / 1 |"
    assert table[4].endswith("| +5.0 / +5.0 / +10.0 | 3 / 0 |")
    assert len(notes) == 1 and notes[0].startswith("Every 5 frames vs First: better on 1 sequence(s) and worse on 1")


@pytest.mark.slow
def test_task_predictions_equal_segment_video(tmp_path):
    """The task's own loop (it needs the InferenceCore for memory entries) = stm_core's segment_video."""
    import torch

    from pipeline.evaluate.stage import payload
    from pipeline.evaluate.worker import decode_annotations, run_sequence
    from stm_core.data.io import decode_index_mask_png
    from stm_core.data.video import read_davis
    from stm_core.inference import segment_video
    from stm_core.model.network import ModelConfig, STMNetwork

    make_tiny_davis(tmp_path)
    seq = read_davis(tmp_path, "val")[1]  # the second object enters at frame 2
    torch.manual_seed(0)
    net = STMNetwork(ModelConfig(decoder_dim=32, norm="frozen_bn")).eval()
    [v] = parse_variants(["stm:every:2"], MemoryParams())
    result = run_sequence(v, net, payload(seq))
    gt = decode_annotations(payload(seq), (64, 64))
    given = {t: torch.from_numpy(m).long() for t, m in given_masks(gt, None).items()}
    frames = (seq.load_frame(t) for t in range(len(seq)))
    expected = [m.numpy() for m in segment_video(net, frames, given, "every:2")]
    assert sorted(given) == [0, 2] and result.memory_entries >= 2
    for t, (png, want) in enumerate(zip(result.masks, expected)):
        assert (decode_index_mask_png(png) == want).all(), t


# ----------------------------------------------------------------------------- end to end

def _square(size: int, x: int, y: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y:y + side, x:x + side] = True
    return m


def make_tiny_davis(root: Path, frames: int = 6, size: int = 64, extra: int = 0) -> list[str]:
    """DAVIS layout: seq-a (one square), seq-b (two squares, the second appears at frame 2), and
    `extra` more sequences like seq-b."""
    rng = np.random.default_rng(1)
    names = ["seq-a", "seq-b"] + [f"seq-{i}" for i in range(extra)]
    for s, name in enumerate(names):
        bg = (rng.random((size, size, 3)) * 80 + 40).astype(np.uint8)
        for t in range(frames):
            image, ids = bg.copy(), np.zeros((size, size), np.uint8)
            objects = [(1, 6 + 4 * t, 10 + 2 * t, (230, 40, 40))]
            if s >= 1 and t >= 2:
                objects.append((2, 44 - 3 * t, 40, (40, 220, 60)))
            for obj, x, y, colour in objects:
                region = _square(size, x, y, 16)
                image[region], ids[region] = colour, obj
            write_image(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", image)
            write_index_mask(root / "Annotations" / "480p" / name / f"{t:05d}.png", ids)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(names) + "\n")
    return names


def _md_rows(text: str, heading: str) -> dict[str, list[str]]:
    part = text.split(heading, 1)[1].split("\n#", 1)[0]  # up to the next heading, of any level
    rows = {}
    for line in part.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and not line.startswith("|---"):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def run_stages(tmp_path: Path, monkeypatch, params: dict, *commands: list[str]) -> None:
    """Write params.yaml in tmp_path and run each `stm` command there on a local Ray instance,
    with the project's MLflow store in tmp_path."""
    import ray

    from pipeline.cli import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for command in commands:
            assert main(command) == 0, command
    finally:
        ray.shutdown()


def test_evaluate_and_report_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import mlflow
    import torch

    from pipeline.cli import main
    from stm_core.model.checkpoint import save_checkpoint
    from stm_core.model.network import ModelConfig, STMNetwork

    data = tmp_path / "bench"
    names = make_tiny_davis(data)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "stm.pt", STMNetwork(ModelConfig(kind="stm", decoder_dim=32, norm="frozen_bn")))
    variants = ["copy-first", "stm:first", "stm:every", "oracle:every"]
    if HAS_STRMN:
        save_checkpoint(tmp_path / "strmn.pt", STMNetwork(ModelConfig(kind="strmn", decoder_dim=32, fusion_dim=16, norm="frozen_bn")))
        variants.append("strmn")
    params = {
        "evaluate": {"variants": variants, "dataset": str(data), "split": "val", "stm_model": str(tmp_path / "stm.pt"),
                     "strmn_model": str(tmp_path / "strmn.pt"), "num_cpus": 1, "overlays": 2},
        "memory": {"every": 2, "slots": 3, "rules": ["A", "C"]},
        "mlflow": {"experiment": "test-eval"},
    }
    run_stages(tmp_path, monkeypatch, params, ["evaluate", "--params", "params.yaml"], ["report"])
    first = Path("reports/ablation.md").read_bytes(), Path("reports/ablation.png").read_bytes()
    assert main(["report"]) == 0  # the same inputs give the same report
    assert (Path("reports/ablation.md").read_bytes(), Path("reports/ablation.png").read_bytes()) == first

    expected = ["copy-first", "stm-first", "stm-every-2", "stm-oracle-every-2"] + (
        ["strmn-recurrent-3-A", "strmn-recurrent-3-C"] if HAS_STRMN else [])
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    assert list(metrics) == expected
    summary = json.loads(Path("metrics/summary.json").read_text())
    labels = ["copy-first", "first", "every", "oracle-every"] + (["strmn-A", "strmn-C"] if HAS_STRMN else [])
    assert list(summary) == ["JF", "FPS"] and list(summary["JF"]) == labels == list(summary["FPS"])
    assert summary["JF"]["every"] == round(100 * metrics["stm-every-2"]["JF_mean"], 1)
    gt_dir = data / "Annotations" / "480p"
    direct = {}
    for name in expected:
        assert sorted(p.name for p in Path("results", name).iterdir() if p.is_dir()) == names
        assert len(list(Path("results", name, "seq-b").glob("*.png"))) == 6
        direct[name] = score_folders(gt_dir, Path("results") / name, names)
        for key, ours in (("J&F-Mean", "JF_mean"), ("J-Mean", "J_mean"), ("F-Mean", "F_mean"),
                          ("J-Recall", "J_recall"), ("F-Decay", "F_decay")):
            assert metrics[name][ours] == pytest.approx(direct[name][key], abs=1e-6), (name, key)
    assert metrics["copy-first"]["memory_entries"] == 0 and metrics["stm-every-2"]["memory_entries"] >= 2

    frames = list(csv.DictReader(Path("plots/evaluate_j_per_frame.csv").open()))
    assert [int(r["frame"]) for r in frames] == [1, 2, 3, 4] and list(frames[0])[1:] == expected
    assert [r["variant"] for r in csv.DictReader(Path("plots/evaluate_variants.csv").open())] == expected

    text = Path("reports/ablation.md").read_text()
    stm = _md_rows(text, "STM Table 5 layout)")
    for label, name in (("Copy first mask (no model)", "copy-first"), ("First", "stm-first"),
                        ("Every 2 frames", "stm-every-2")):
        jf, j, f = (f"{100 * direct[name][k]:.1f}" for k in ("J&F-Mean", "J-Mean", "F-Mean"))
        assert stm[label][:3] == [jf, j, f], label
    oracle = _md_rows(text, "(oracle diagnostic)")  # the ground truth in memory, beside the plain policy
    assert oracle["STM: Every 2 frames"][:2] == [f"{100 * direct[n]['J&F-Mean']:.1f}"
                                                 for n in ("stm-every-2", "stm-oracle-every-2")]
    per_sequence = _md_rows(text, "sequence by sequence (J&F)")
    first = {r["sequence"]: float(r["JF_mean"]) for r in csv.DictReader(Path("results/stm-first/sequences.csv").open())}
    assert per_sequence["First"][:2] == [f"{100 * first[n]:.1f}" for n in names]
    assert per_sequence["Every 2 frames"][-1] in {f"{b} / {w}" for b in range(3) for w in range(3 - b)}
    if HAS_STRMN:
        strmn = _md_rows(text, "STRMN Table 4 layout)")
        for label, name in (("Least similarity pair (C)", "strmn-recurrent-3-C"),
                            ("Oldest vs remaining (A)", "strmn-recurrent-3-A"),
                            ("Copy first mask (no model)", "copy-first")):
            j, f, jf = (f"{100 * direct[name][k]:.1f}" for k in ("J-Mean", "F-Mean", "J&F-Mean"))
            assert strmn[label][:3] == [j, f, jf], label
        assert strmn["Least similarity pair (C)"][3] == "3"
    assert Path("reports/ablation.png").stat().st_size > 1000

    run_id = json.loads(Path("results/evaluation.json").read_text())["parent_run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = mlflow.search_runs(experiment_names=["test-eval"], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(children["tags.stm_variant"]) == sorted(expected)
    assert set(children["status"]) == {"FINISHED"}
    client = mlflow.MlflowClient()
    child = children[children["tags.stm_variant"] == "stm-every-2"].iloc[0]
    assert child["params.policy"] == "every:2"
    assert child["metrics.JF_mean"] == pytest.approx(direct["stm-every-2"]["J&F-Mean"], abs=1e-6)
    arts = {a.path for a in client.list_artifacts(child["run_id"])}
    assert {"sequences.csv", "overlays"} <= arts
    assert len(client.list_artifacts(child["run_id"], "overlays")) == 2
    assert {a.path for a in client.list_artifacts(run_id, "report")} == {"report/ablation.md", "report/ablation.png"}

    # the read probe ran on the actors; its record equals the probe run here on the same files
    probe = json.loads(Path("results/read_probe.json").read_text())
    expected_probe = direct_read_probe(tmp_path / "stm.pt", data, names, every=2)
    assert list(probe["sequences"]) == names and probe["every"] == 2
    for memory in ("first", "every:2"):
        for key in ("precision", "chance", "sink_share", "samples"):
            assert probe["memories"][memory][key] == pytest.approx(expected_probe[memory][key], abs=1e-5), (memory, key)
    assert Path("results/read_probe.png").stat().st_size > 500
    section = text.split("## Where the memory read looks (read probe)")[1].split("## ")[0]
    assert f"| `first` | {100 * probe['memories']['first']['precision']:.1f}% |" in section
    assert "`../results/read_probe.png`, written by `stm evaluate`" in section and "![read probe]" not in section
    assert {a.path for a in client.list_artifacts(run_id, "read_probe")} == {"read_probe/read_probe.json",
                                                                            "read_probe/read_probe.png"}
    parent = client.get_run(run_id).data.metrics
    assert parent["read_probe.every_2.samples"] == expected_probe["every:2"]["samples"]


def direct_read_probe(checkpoint: Path, data: Path, names: list[str], every: int) -> dict:
    """stm_core.read_probe over the benchmark's files, outside Ray: the reference for the stage's record."""
    import torch

    from stm_core.data.io import read_frame, read_index_mask
    from stm_core.model.checkpoint import load_checkpoint
    from stm_core.read_probe import ProbeTotals, probe_sequence

    network = load_checkpoint(checkpoint).eval()
    overall: dict[str, ProbeTotals] = {}
    for name in names:
        frames = [read_frame(f) for f in sorted((data / "JPEGImages" / "480p" / name).glob("*.jpg"))]
        masks = {t: torch.from_numpy(read_index_mask(f).astype(np.int64)) for t, f in
                 enumerate(sorted((data / "Annotations" / "480p" / name).glob("*.png")))}
        for memory, totals in probe_sequence(network, frames, masks, every)[0].items():
            overall.setdefault(memory, ProbeTotals()).merge(totals)
    return {memory: totals.summary() for memory, totals in overall.items()}


@pytest.mark.slow
def test_evaluation_loads_each_checkpoint_once_per_worker(tmp_path, monkeypatch):
    """10 variants x 8 sequences on a pool of actors: every actor loads each checkpoint it uses once."""
    pytest.importorskip("ray")
    import torch

    from stm_core.model.checkpoint import save_checkpoint
    from stm_core.model.network import ModelConfig, STMNetwork

    data = tmp_path / "bench"
    names = make_tiny_davis(data, frames=4, size=48, extra=6)
    assert len(names) == 8
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "stm.pt", STMNetwork(ModelConfig(kind="stm", decoder_dim=16, norm="frozen_bn")))
    save_checkpoint(tmp_path / "strmn.pt", STMNetwork(ModelConfig(kind="strmn", decoder_dim=16, fusion_dim=8, norm="frozen_bn")))
    variants = ["copy-first", "stm:first", "stm:previous", "stm:first+previous", "stm:every", "stm:fifo", "strmn"]
    params = {
        "evaluate": {"variants": variants, "dataset": str(data), "split": "val", "stm_model": str(tmp_path / "stm.pt"),
                     "strmn_model": str(tmp_path / "strmn.pt"), "num_cpus": 1, "overlays": 0},
        "memory": {"every": 2, "fifo": 3, "slots": 3, "rules": ["A", "B", "C", "D"]},
        "mlflow": {"experiment": "test-eval-loads"},
    }
    run_stages(tmp_path, monkeypatch, params, ["evaluate", "--params", "params.yaml"])
    metrics = json.loads(Path("metrics/evaluate.json").read_text())
    assert len(metrics) == 10
    loads = json.loads(Path("results/evaluation.json").read_text())["checkpoint_loads"]
    assert len(loads) == 2  # one actor per CPU share
    assert all(n == 1 for actor in loads for n in actor.values()), loads
    assert sum(len(actor) for actor in loads) <= 4  # 2 checkpoints x 2 actors, 80 items


def test_the_driver_deserialises_each_checkpoint_once(tmp_path, monkeypatch):
    """checkpoint_files (kind check) and the MLflow params (training_data) share one torch.load."""
    import torch

    from pipeline.evaluate import stage
    from pipeline.evaluate.variants import MemoryParams, parse_variants
    from stm_core.model.checkpoint import save_checkpoint
    from stm_core.model.network import ModelConfig, STMNetwork

    path = tmp_path / "stm.pt"
    save_checkpoint(path, STMNetwork(ModelConfig(decoder_dim=8, norm="frozen_bn")), training_data="static images")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    params = stage.EvaluateParams(stm_model=str(path))
    models = stage.checkpoint_files(params, parse_variants(["stm:first", "stm:every"], MemoryParams()))
    (_, data), = models.values()
    assert stage.checkpoint_training_data(data) == "static images"
    assert len(loads) == 1


def test_work_is_dispatched_heaviest_first(tmp_path):
    """LPT order: long, many-object sequences with costly variants go first, copy-first last, so the
    actor pool does not end on one long item while the others idle."""
    from pipeline.evaluate.inputs import item_cost, object_count
    from pipeline.workpool import Item, by_cost
    from stm_core.data.video import VideoSequence

    def sequence(name: str, frames: int, objects: int) -> VideoSequence:
        mask = tmp_path / f"{name}.png"
        write_index_mask(mask, np.arange(objects + 1, dtype=np.uint8).repeat(4).reshape(-1, 1).repeat(4, 1))
        return VideoSequence(name, [tmp_path / f"{name}-{t}.jpg" for t in range(frames)], {0: mask})

    variants = parse_variants(["copy-first", "stm:first", "stm:every", "strmn:C"], MemoryParams(slots=4))
    videos = [sequence("short-one", 10, 1), sequence("long-three", 40, 3)]
    items = [Item(f"{v.name}/{s.name}", item_cost(v, s, object_count(s))) for s in videos for v in variants]
    order = [tuple(item.key.split("/")) for item in by_cost(items)]  # the order the pool dispatches in
    assert order[0] == ("strmn-recurrent-4-C", "long-three")
    assert order[:3] == [("strmn-recurrent-4-C", "long-three"), ("stm-every-5", "long-three"),
                         ("stm-first", "long-three")]
    assert {o[0] for o in order[-2:]} == {"copy-first"}
    assert sorted(order) == sorted((v.name, s.name) for s in videos for v in variants)


def test_a_reproducible_evaluation_fixes_the_convolution_kernels():
    """evaluate.reproducible (the default) turns off the timed Winograd choice in each worker process."""
    from pipeline.evaluate.stage import EvaluateParams
    from pipeline.evaluate.worker import EvaluationWorker
    from stm_core.model import fast_path

    assert EvaluateParams().reproducible
    try:
        EvaluationWorker("cpu", None, None, 1)
        assert fast_path.winograd_mode() == "off"
        EvaluationWorker("cpu", None, None, 1, reproducible=False)
        assert fast_path.winograd_mode() == "auto"
    finally:
        fast_path.set_winograd_mode("auto")
