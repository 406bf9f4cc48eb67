"""The plateau learning-rate schedule (STRMN sec. 3.4.2) and its held-out validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from training_configs import loop_config, plain_loss, stage_params, video_data

from pipeline.params import ParamsError
from pipeline.train.loop_config import holdout
from pipeline.train.schedule import Plateau, check_plateau, split_holdout
from pipeline.train.settings import StrmnParams, settings

REPO = Path(__file__).resolve().parents[1]


def test_rate_drops_tenfold_each_time_the_error_does_not_decrease():
    p = Plateau()
    assert [p.update(e) for e in (1.0, 0.8, 0.9, 0.7, 0.7, 0.6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    patient = Plateau(patience=1)
    assert [patient.update(e) for e in (1.0, 1.1, 1.2)] == pytest.approx([1, 1, 0.1])
    restored = Plateau()
    restored.load_state_dict(p.state_dict())
    assert restored == p
    with pytest.raises(ValueError, match="finite"):
        p.update(float("nan"))
    floored = Plateau(min_scale=0.01)  # never below the floor, however long the plateau
    assert [floored.update(e) for e in (1.0, 1.0, 1.0, 1.0)] == pytest.approx([1, 0.1, 0.01, 0.01])
    assert floored.drops == 2


def test_holdout_only_for_plateau_stages_and_never_everything():
    assert holdout(stage_params(lr_schedule="constant", val_holdout=3)) == 0
    assert holdout(stage_params(lr_schedule="plateau", val_holdout=3)) == 3
    assert split_holdout(list("abcde"), 2) == (list("abc"), list("de"))
    with pytest.raises(ValueError, match="leaves no training video"):
        split_holdout(list("ab"), 2)


def test_paper_recipe_pretrains_strmn_on_a_plateau_that_cannot_starve_it(tmp_path: Path):
    pre = settings(REPO / "params-paper.yaml", "pretrain", "strmn")
    sp = pre.stage_params
    assert (sp.lr, sp.lr_schedule, sp.data_format, sp.precision) == (1e-4, "plateau", "parquet", "fp32")
    assert sp.plateau_patience >= 1 and sp.plateau_min_scale > 0 and sp.steps // sp.val_every >= 10
    main = settings(REPO / "params-paper.yaml", "main", "strmn", "C")
    assert (main.stage_params.lr, main.stage_params.lr_schedule, main.strmn.slots) == (1e-4, "constant", 5)
    assert main.stage_params.val_holdout == 0 and main.strmn.continuous and main.stage_params.max_skip == 0
    assert (main.strmn.main_frames, main.strmn.segment_length, main.model.norm) == (50, 10, "group")
    assert main.strmn.short_videos == "repeat"
    assert settings(REPO / "params-paper.yaml", "pretrain", "stm").stage_params.lr_schedule == "constant"

    def with_pretrain(**values) -> Path:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["pretrain"].update(values)  # shared keys set for pretraining only
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        return tmp_path / "params.yaml"

    with pytest.raises(ParamsError, match=r"params.yaml: pretrain.*val_every >= 1"):
        settings(with_pretrain(lr_schedule="plateau"), "pretrain", "stm")
    with pytest.raises(ParamsError, match=r"params.yaml: pretrain.*patience 0 and no floor"):
        settings(with_pretrain(lr_schedule="plateau", val_every=10), "pretrain", "stm")
    with pytest.raises(ParamsError, match=r"params.yaml: pretrain.*would never change"):
        settings(with_pretrain(lr_schedule="plateau", val_every=500, plateau_patience=1), "pretrain", "stm")
    ok = settings(with_pretrain(lr_schedule="plateau", val_every=10, plateau_min_scale=0.01), "pretrain", "stm")
    assert ok.stage_params.lr_schedule == "plateau"  # Parquet pretraining validates on the set's _val clips


def test_validation_runs_on_held_out_clips_and_is_kept_for_checkpoints(tmp_path: Path):
    import torch

    from pipeline.train.loop import Unroll, plateau_setup
    from stm_core.data.builtin_videos import BuiltinVideosConfig, write_builtin_videos
    from stm_core.model.network import ModelConfig, STMNetwork

    root = tmp_path / "videos"
    write_builtin_videos(root, BuiltinVideosConfig(height=48, width=48, frames=6, train_sequences=3, val_sequences=0), 0)
    train = plain_loss(lr_schedule="plateau", val_holdout=1, val_clips=2, plateau_factor=0.1, plateau_patience=0,
                       plateau_min_scale=0.0, crop=48, max_objects=2)
    config = loop_config(train=train, frames=3, seed=0, per_worker_batch=2, data=video_data(str(root)))
    totals: dict = {}
    plateau, batches = plateau_setup(config, torch.device("cpu"), totals)
    assert plateau is not None and len(batches) == 1 and batches[0][0].shape[:2] == (2, 3)
    torch.manual_seed(0)
    unroll = Unroll(STMNetwork(ModelConfig(decoder_dim=16, norm="frozen_bn")), train, StrmnParams())
    first = check_plateau(plateau, unroll, batches, totals)
    again = check_plateau(plateau, unroll, batches, totals)
    assert first == pytest.approx(again)  # fixed clips, same weights: no decrease, so one drop
    assert totals["plateau"]["scale"] == pytest.approx(0.1) and unroll.training
    constant = dataclasses.replace(config, train=dataclasses.replace(train, lr_schedule="constant"))
    assert plateau_setup(constant, torch.device("cpu"), {}) == (None, [])
