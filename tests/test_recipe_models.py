"""stm_core.recipe's networks are the ones `stm train` builds from params-paper.yaml, and the torch-only
benchmarks time them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pipeline.train.settings import settings
from stm_core.recipe import (
    RECIPE_STRMN_PRETRAIN_FRAMES,
    RECIPE_STRMN_SEGMENT,
    RECIPE_STRMN_SLOTS,
    recipe_model,
)
from stm_core.train_bench import main as train_bench

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["stm", "strmn"])
def test_the_recipe_models_are_what_training_builds_from_the_paper_params(kind):
    built = settings(REPO / "params-paper.yaml", "pretrain", kind)
    assert recipe_model(kind) == dataclasses.replace(built.model, pretrained="none")
    if kind == "strmn":
        assert (built.strmn.slots, built.strmn.segment_length, built.strmn.pretrain_frames) == (
            RECIPE_STRMN_SLOTS, RECIPE_STRMN_SEGMENT, RECIPE_STRMN_PRETRAIN_FRAMES)


def test_train_bench_times_the_recipe_strmn_in_exact_fp32_and_restores_the_settings(capsys):
    before = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    out = train_bench(["--device", "cpu", "--kind", "strmn", "--backbone", "resnet18", "--decoder-dim", "16",
                       "--crop", "32", "--batch", "1", "--frames", "3", "--warmup", "0", "--steps", "1",
                       "--precision", "fp32"])
    assert out["fp32_math"] == "ieee" and out["precision"] == "fp32" and out["ms_per_step"] > 0
    assert out["model"] == {**recipe_model("strmn", "resnet18").to_dict(), "decoder_dim": 16}
    assert (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == before
    assert json.loads(capsys.readouterr().out)["kind"] == "strmn"
