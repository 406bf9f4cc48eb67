"""The STRMN stages' settings, resolved in one place from params to the values a run uses.

A STRMN stage starts from the stage's own section (`training:` under `pretrain:` / `train:`), then
takes the `strmn:` keys that override it: `strmn.lr` (both stages), `strmn.pretrain_steps` and
`strmn.pretrain_lr_schedule` (pretraining), `strmn.lr_schedule` (fine-tuning), and for the per-rule
fine-tuning (`stm train --stage main --model strmn --rule R`, dvc.yaml's `train_strmn` foreach)
`strmn.rule = R`, `strmn.main_steps` with its checkpoint interval and warm-up, and `strmn.continuous`.
Every value derived here is logged, and the driver logs the resolved settings as the run's params,
so what a run used is never a guess.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.params import ParamsError
from stm_core.memory.recurrent import I2M, STRMN_RULES

if TYPE_CHECKING:
    from pipeline.train.settings import StageParams, StrmnParams

log = logging.getLogger(__name__)
SCHEDULES = ("constant", "cosine", "plateau")


def resolve_strmn(params_file: str | Path, stage: str, rule: str | None, strmn: StrmnParams,
                  stage_params: StageParams) -> tuple[StrmnParams, StageParams]:
    """-> (strmn, stage params) as the STRMN run of `stage` (pretrain | main) and `rule` uses them.
    Raises ParamsError naming the file when a value or the request makes no sense."""
    from pipeline.train.schedule import check_stage

    pretraining = stage == "pretrain"
    schedule_key = "pretrain_lr_schedule" if pretraining else "lr_schedule"
    schedule = getattr(strmn, schedule_key)
    if schedule not in (None, *SCHEDULES):
        raise ParamsError(f"{params_file}: strmn.{schedule_key} must be null or one of {SCHEDULES}, got {schedule!r}")
    steps = strmn.pretrain_steps if pretraining else None
    if steps is not None and steps < 1:
        raise ParamsError(f"{params_file}: strmn.pretrain_steps must be >= 1 (or null: pretrain.steps), got {steps}")
    changes: dict[str, Any] = {k: v for k, v in (("lr", strmn.lr), ("lr_schedule", schedule), ("steps", steps))
                               if v is not None}
    if rule is not None:
        strmn, rule_changes = _per_rule(params_file, stage, rule, strmn, stage_params)
        changes.update(rule_changes)
    for key, value in changes.items():
        if getattr(stage_params, key) != value:
            log.info("STRMN %s%s: %s = %r (params give %r)", stage, f" rule {rule}" if rule else "", key, value,
                     getattr(stage_params, key))
    out = dataclasses.replace(stage_params, **changes)
    try:
        check_stage(out, f"{params_file}: {'pretrain' if pretraining else 'train'} (STRMN)")
    except ValueError as err:
        raise ParamsError(str(err)) from err
    return strmn, out


def _per_rule(params_file: str | Path, stage: str, rule: str, strmn: StrmnParams,
              stage_params: StageParams) -> tuple[StrmnParams, dict[str, Any]]:
    """The per-rule fine-tuning's own values: its rule, `strmn.main_steps`, `strmn.continuous`."""
    if stage != "main":
        raise ParamsError(f"{params_file}: --rule applies to the STRMN main stage only (--stage main --model strmn)")
    if rule not in STRMN_RULES:
        raise ParamsError(f"{params_file}: unknown STRMN rule {rule!r}; choose one of {STRMN_RULES}")
    minimum = 2 if rule == I2M else 3
    if strmn.slots < minimum:
        raise ParamsError(f"{params_file}: strmn.slots = {strmn.slots} is too few for rule {rule} (needs >= {minimum})")
    changes: dict[str, Any] = {}
    if strmn.main_steps:
        changes["steps"] = strmn.main_steps
        changes["checkpoint_every"] = min(stage_params.checkpoint_every, strmn.main_steps)
        # a brief fine-tune from trained weights: at most a quarter of it is spent warming up
        changes["warmup_steps"] = min(stage_params.warmup_steps, strmn.main_steps // 4)
    if strmn.continuous:
        changes["max_skip"] = 0
    return dataclasses.replace(strmn, rule=rule), changes
