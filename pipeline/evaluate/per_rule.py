"""Which checkpoint a variant runs with: STRMN variants use their rule's own model when
`evaluate.strmn_model` names one per rule (`models/strmn-main/{rule}/model.pt`, written by the
`train_strmn@<RULE>` stages), so each rule is tested with the model trained with it."""

from __future__ import annotations

from pipeline.evaluate.variants import Variant

RULE_FIELD = "{rule}"


def model_key(v: Variant, strmn_model: str) -> str:
    """'stm', 'strmn', 'none', or 'strmn@<RULE>' for a STRMN variant with a per-rule checkpoint."""
    if v.model == "strmn" and RULE_FIELD in strmn_model:
        if v.rule is None:
            raise ValueError(f"variant {v.name}: evaluate.strmn_model {strmn_model!r} has one checkpoint per rule, "
                             "but this policy names no rule (use recurrent:K:RULE or recurrent-i2m:K)")
        return f"strmn@{v.rule}"
    return v.model


def checkpoint_path(key: str, stm_model: str, strmn_model: str) -> str:
    """The checkpoint's path or URI (kept a string: `Path` would mangle `s3://`)."""
    kind, _, rule = key.partition("@")
    return stm_model if kind == "stm" else strmn_model.replace(RULE_FIELD, rule)
