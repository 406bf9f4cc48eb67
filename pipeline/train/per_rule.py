"""STRMN's per-rule fine-tuning (`stm train --stage main --model strmn --rule R`, dvc.yaml's
`train_strmn` foreach): every update rule gets its own model, fine-tuned from the one shared
STRMN pretraining, so each variant of STRMN Tables 3-4 is trained with the rule it is tested with."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.params import ParamsError

RULES = ("A", "B", "C", "D", "I2M")


def apply_rule(params_file: str | Path, stage: str, kind: str, rule: str, strmn, stage_params):
    """-> (strmn, stage params) for the main stage of `rule`: strmn.rule set, strmn.main_steps and
    strmn.continuous applied. Raises ParamsError naming the file when the request makes no sense."""
    if kind != "strmn" or stage != "main":
        raise ParamsError(f"{params_file}: --rule applies to the STRMN main stage only (--stage main --model strmn)")
    if rule not in RULES:
        raise ParamsError(f"{params_file}: unknown STRMN rule {rule!r}; choose one of {RULES}")
    minimum = 2 if rule == "I2M" else 3
    if strmn.slots < minimum:
        raise ParamsError(f"{params_file}: strmn.slots = {strmn.slots} is too few for rule {rule} (needs >= {minimum})")
    strmn = dataclasses.replace(strmn, rule=rule)
    changes = {}
    if strmn.main_steps:
        changes["steps"] = strmn.main_steps
        changes["checkpoint_every"] = min(stage_params.checkpoint_every, strmn.main_steps)
        # a brief fine-tune from trained weights: most of it must not be spent warming up
        changes["warmup_steps"] = min(stage_params.warmup_steps, strmn.main_steps // 4)
    if strmn.continuous:
        changes["max_skip"] = 0
    return strmn, dataclasses.replace(stage_params, **changes)


def strmn_overrides(params_file: str | Path, section_name: str, strmn, stage_params):
    """The STRMN stages' own learning rate (strmn.lr, both stages), pretraining steps
    (strmn.pretrain_steps) and schedules (strmn.pretrain_lr_schedule, strmn.lr_schedule), checked."""
    from pipeline.train.schedule import check_stage

    schedule = strmn.lr_schedule if section_name == "train" else strmn.pretrain_lr_schedule
    steps = strmn.pretrain_steps if section_name == "pretrain" else None
    changes = {k: v for k, v in (("lr", strmn.lr), ("lr_schedule", schedule), ("steps", steps)) if v is not None}
    if changes.get("lr_schedule") not in (None, "constant", "cosine", "plateau"):
        key = "lr_schedule" if section_name == "train" else "pretrain_lr_schedule"
        raise ParamsError(f"{params_file}: strmn.{key} must be null, constant, cosine or plateau, "
                          f"got {changes['lr_schedule']!r}")
    if steps is not None and steps < 1:
        raise ParamsError(f"{params_file}: strmn.pretrain_steps must be >= 1 (or null: pretrain.steps), got {steps}")
    out = dataclasses.replace(stage_params, **changes)
    try:
        check_stage(out, f"{params_file}: {section_name} (STRMN)")
    except ValueError as err:
        raise ParamsError(str(err)) from err
    return out
