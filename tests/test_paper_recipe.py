"""A dry run of the papers' recipe: params-paper.yaml with only sizes, steps and data paths changed
(64-pixel crops, 2 steps, the built-in data in place of the downloads), through every stage's real
`stm` command on CPU, so each code path only the recipe takes runs here: ResNet-50 with frozen
BatchNorm (STM) and GroupNorm (STRMN), single-image affine clips, STRMN's plateau on held-out
validation clips in pretraining, K = 5 slots, TBPTT segments (10 frames in 2 segments of 5 instead
of 50 in 10 segments of 10), short videos played back and forth, eq. 3 unscaled, keys for S,
post-processing. ImageNet weights need the internet: `model.pretrained: none` (a size of the run,
not of the recipe)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.params import load_params
from pipeline.train.settings import stage_section

REPO = Path(__file__).resolve().parents[1]

# Everything the dry run changes, and nothing else: sizes, steps, data (and CPU placement).
DRY_RUN = """\
extends: params-paper.yaml
replace: [download.sources]
download:
  sources:  # the built-in sets in place of the downloads
    builtin-images: {count: 12, size: 64}
    builtin-videos: {style: easy, height: 64, width: 64, frames: 8, train_sequences: 3, val_sequences: 1}
synthesize:
  sources: [builtin-images]
  sets:
    stm: {clips: 8}
    strmn: {clips: 8, sources: [builtin-images], val_clips: 2}
  height: 64
  width: 64
  val_share: 0.3
  clips_per_shard: 8
model: {pretrained: none}
strmn: {main_frames: 10, segment_length: 5, rules: [C]}
pretrain: {steps: 2, crop: 64, val_every: 1, val_clips: 2, checkpoint_every: 2, log_every: 1, log_images_every: 0}
train: {steps: 2, crop: 64, data: data/raw/builtin-videos, checkpoint_every: 2, log_every: 1, log_images_every: 0}
ray: {num_workers: 0, use_gpu: false, cpus_per_worker: 1.0, num_cpus: 2}
memory: {rules: [C]}
evaluate: {dataset: data/raw/builtin-videos, device: cpu, max_sequences: 1, num_cpus: 1.0, overlays: 0, probe_sequences: 0}
"""


def stm(workspace: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "STM_STORAGE_ROOT", "MLFLOW_TRACKING_URI", "DVC_ROOT")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--params", "dry-run.yaml"], cwd=workspace,
                          env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"stm {' '.join(args)} failed:\n{log[-4000:]}"
    print(f"stm {' '.join(args)}: {time.perf_counter() - start:.1f} s")
    return log


@pytest.mark.slow
def test_the_paper_recipe_runs_through_every_stage_on_cpu(tmp_path: Path):
    ws = tmp_path / "ws"
    (ws / ".dvc").mkdir(parents=True)  # the workspace root (data/, models/, metrics/ and mlflow.db go here)
    for name in ("params.yaml", "params-paper.yaml"):
        shutil.copy(REPO / name, ws / name)
    (ws / "dry-run.yaml").write_text(DRY_RUN)
    params, paper = load_params(ws / "dry-run.yaml"), load_params(REPO / "params-paper.yaml")
    # Only sizes, steps and data changed: the model and training choices are the recipe's.
    for key in ("backbone", "norm", "decoder_dim", "fusion_scale", "similarity"):
        assert params["model"][key] == paper["model"][key]
    for stage in ("pretrain", "train"):
        ours, theirs = stage_section(params, stage), stage_section(paper, stage)
        for key in ("lr", "precision", "plateau_patience", "plateau_min_scale", "batch_size"):
            assert getattr(ours, key) == getattr(theirs, key), f"{stage}.{key}"
    assert {k: v for k, v in params["strmn"].items() if k not in ("main_frames", "segment_length", "rules")} == \
        {k: v for k, v in paper["strmn"].items() if k not in ("main_frames", "segment_length", "rules")}

    stm(ws, "download")
    stm(ws, "synthesize")
    manifest = json.loads((ws / "data/synthetic/strmn/_manifest.json").read_text())
    assert manifest["config"]["mode"] == "affine" and manifest["config"]["split"] == "train"
    val = json.loads((ws / "data/synthetic/strmn/_val/_manifest.json").read_text())
    assert val["clips"] == 2 and val["config"]["split"] == "val"

    stm(ws, "train", "--stage", "pretrain", "--model", "stm")
    log = stm(ws, "train", "--stage", "pretrain", "--model", "strmn")
    assert log.count("validation loss") == 2, log[-3000:]  # the plateau checked the held-out clips each step
    stm(ws, "train", "--stage", "main", "--model", "stm")
    log = stm(ws, "train", "--stage", "main", "--model", "strmn", "--rule", "C")
    assert "3 training videos, 3 shorter than 10 annotated frames (repeat: 0 never seen)" in log, log[-3000:]
    counts = json.loads((ws / "metrics/train-main-strmn-C.json").read_text())
    assert (counts["videos"], counts["short_videos"], counts["dropped_videos"], counts["steps"]) == (3, 3, 0, 2)

    for path, kind, norm in (("models/main/model.pt", "stm", "frozen_bn"),
                             ("models/strmn-main/C/model.pt", "strmn", "group")):
        config = torch.load(ws / path, map_location="cpu", weights_only=True)["model_config"]
        assert (config["kind"], config["backbone"], config["norm"]) == (kind, "resnet50", norm)
        assert (config["fusion_scale"], config["similarity"], config["decoder_dim"]) == ("none", "keys", 256)

    stm(ws, "evaluate")
    summary = json.loads((ws / "metrics/summary.json").read_text())
    for name in ("every", "strmn-C"):  # STM every:5 and the STRMN rule trained above, each scored
        assert name in summary["JF"] and 0.0 <= summary["JF"][name] <= 100.0, summary
        assert summary["FPS"][name] > 0, summary
