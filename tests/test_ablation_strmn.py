"""Per-rule STRMN training and evaluation, post-processing, similarity / scale params,
and the report's 'could not differ' notes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from pipeline.evaluate.per_rule import checkpoint_path, model_key
from pipeline.evaluate.variants import MemoryParams, parse_variants
from pipeline.params import ParamsError
from pipeline.report.distinct import distinct_notes
from pipeline.train.settings import run_name, settings
from stm_core.memory.recurrent import select_update
from stm_core.model.network import ModelConfig, STMNetwork
from stm_core.postprocess import remove_far_blobs

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- post-processing

def test_postprocess_removes_the_far_blob_and_keeps_the_near_one():
    previous = np.zeros((64, 64), np.uint8)
    previous[10:20, 10:20] = 1
    pred = np.zeros_like(previous)
    pred[12:22, 12:22] = 1  # moved a little: kept
    pred[50:56, 50:56] = 1  # a far false positive: removed
    pred[40:44, 2:6] = 2  # another object, absent before: left alone
    out = remove_far_blobs(pred, previous)
    assert (out[12:22, 12:22] == 1).all()
    assert (out[50:56, 50:56] == 0).all()
    assert (out[40:44, 2:6] == 2).all()


def test_postprocess_keeps_an_object_with_no_near_blob():
    previous = np.zeros((64, 64), np.uint8)
    previous[0:6, 0:6] = 1
    pred = np.zeros_like(previous)
    pred[40:46, 40:46] = 1
    pred[56:60, 20:24] = 1
    assert np.array_equal(remove_far_blobs(pred, previous), pred)  # nothing near: nothing to prefer


# ---------------------------------------------------------------- variants and checkpoints per rule

def test_strmn_expands_to_every_rule_and_i2m_with_their_own_checkpoints():
    memory = MemoryParams(slots=4, rules=["A", "B", "C", "D", "I2M"])
    variants = parse_variants(["copy-first", "stm:every", "strmn"], memory)
    strmn = [v for v in variants if v.model == "strmn"]
    assert [v.policy for v in strmn] == ["recurrent:4:A", "recurrent:4:B", "recurrent:4:C", "recurrent:4:D",
                                         "recurrent-i2m:4"]
    assert all(v.postprocess for v in strmn) and not any(v.postprocess for v in variants if v.model != "strmn")
    template = "models/strmn-main/{rule}/model.pt"
    keys = [model_key(v, template) for v in strmn]
    assert keys == ["strmn@A", "strmn@B", "strmn@C", "strmn@D", "strmn@I2M"]
    assert checkpoint_path("strmn@I2M", "m.pt", template) == "models/strmn-main/I2M/model.pt"
    assert model_key(strmn[0], "models/strmn-main/model.pt") == "strmn"  # one shared checkpoint still works
    none = parse_variants(["strmn:C"], MemoryParams(slots=4, postprocess="none"))
    assert not none[0].postprocess


def test_each_rule_stage_trains_with_its_rule_into_its_own_folder():
    params = REPO / "params.yaml"
    runs = set()
    for rule in ("A", "B", "C", "D", "I2M"):
        s = settings(params, "main", "strmn", rule)
        assert s.strmn.rule == rule
        assert s.model_out == s.root / "models" / "strmn-main" / rule / "model.pt"
        assert s.metrics_out.name == f"train-main-strmn-{rule}.json"
        assert s.stage_params.steps == s.strmn.main_steps
        assert s.init_path() == s.root / "models" / "strmn-pretrain" / "model.pt"  # one shared pretraining
        runs.add(run_name(s, None))
    assert len(runs) == 5  # different recipes: no rule resumes another's checkpoints
    with pytest.raises(ParamsError, match="params.yaml.*--rule applies to the STRMN main stage"):
        settings(params, "main", "stm", "A")


def test_strmn_pretraining_takes_its_own_steps(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["pretrain"]["steps"], raw["strmn"]["pretrain_steps"] = 50, 7
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    assert settings(params, "pretrain", "strmn").stage_params.steps == 7
    assert settings(params, "pretrain", "stm").stage_params.steps == 50  # STM keeps pretrain.steps
    assert settings(params, "main", "strmn", "C").stage_params.steps == raw["strmn"]["main_steps"]
    raw["strmn"]["pretrain_steps"] = None
    params.write_text(yaml.safe_dump(raw))
    assert settings(params, "pretrain", "strmn").stage_params.steps == 50
    raw["strmn"]["pretrain_steps"] = 0
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"params.yaml: strmn.pretrain_steps must be >= 1"):
        settings(params, "pretrain", "strmn")


def test_embedded_default_lets_the_rules_differ():
    s = settings(REPO / "params.yaml", "main", "strmn")
    assert s.strmn.slots >= 4 and s.frames >= s.strmn.slots + 2  # full memory, then updates, in a clip


# ---------------------------------------------------------------- similarity and scale params

def test_rules_c_d_can_compare_keys_instead_of_templates():
    feature = torch.zeros(1, 1, 4, 2, 1, 1)  # templates: slots 2 and 3 identical, slot 4 orthogonal
    feature[..., 0, 0, 0] = 1.0
    feature[0, 0, 3, 0] = 0.0
    feature[0, 0, 3, 1] = 1.0
    key = torch.zeros(1, 1, 4, 1, 2)  # keys say the opposite: slots 2 and 4 identical, 3 orthogonal
    key[..., 0] = 1.0
    key[0, 0, 2] = torch.tensor([0.0, 1.0])
    assert select_update("D", feature)[1].item() == 2  # templates: most similar pair (2, 3)
    assert select_update("D", feature, key)[1].item() == 3  # keys: most similar pair (2, 4)


def test_fusion_scale_and_similarity_are_model_params():
    net = STMNetwork(ModelConfig(kind="strmn", norm="group", decoder_dim=16, fusion_dim=8, fusion_scale="none",
                                 similarity="keys"))
    assert net.fusion.scale == 1.0 and net.fusion.similarity == "keys"
    default = STMNetwork(ModelConfig(kind="strmn", norm="group", decoder_dim=16, fusion_dim=8))
    assert default.fusion.scale == pytest.approx(1 / 256 ** 0.5) and default.fusion.similarity == "templates"


# ---------------------------------------------------------------- report notes

def _row(variant: str, rule: str, size: int, jf: float, entries: float = 4.0):
    return SimpleNamespace(variant=variant, model="strmn", rule=rule, size=size, policy=f"recurrent:{size}:{rule}",
                           metrics={"JF_mean": jf, "J_mean": jf, "F_mean": jf, "memory_entries": entries})


def test_report_says_when_rules_could_not_differ():
    k3 = [_row(f"strmn-recurrent-3-{r}", r, 3, 0.285) for r in "ACD"] + [_row("strmn-recurrent-3-B", "B", 3, 0.3)]
    notes = distinct_notes(k3)
    assert len(notes) == 1 and "Rules A, C, D could not differ at K = 3" in notes[0]
    k4 = [_row(f"strmn-recurrent-4-{r}", r, 4, 0.3 + 0.01 * i) for i, r in enumerate("ABCD")]
    assert distinct_notes(k4) == []
    never_full = [_row(f"v{r}", r, 5, 0.3 + 0.01 * i, entries=3) for i, r in enumerate("AB")]
    assert "never filled" in distinct_notes(never_full)[0]
    same = [_row("strmn-recurrent-4-A", "A", 4, 0.31), _row("strmn-recurrent-4-B", "B", 4, 0.31)]
    assert "scored identically" in distinct_notes(same)[0]
