"""The paper recipe's networks for the torch-only benchmarks (`stm_core.bench`, `stm_core.train_bench`,
benchmarks/gpu.sh), which run where params files cannot be read (no PyYAML, no pipeline).

They are what `stm train` builds from params-paper.yaml over params.yaml: STM with frozen BatchNorm
and the 256-channel decoder; STRMN with the backbone normalisation of `strmn.norm` (GroupNorm), the
unscaled Fusion Cell attention (`model.fusion_scale: none`, eq. 3) and the similarity of the read
keys (`model.similarity: keys`, eq. 1-2). tests/test_recipe_models.py holds them equal to what
`pipeline.train.settings` builds from those files, so the two cannot drift apart. Weights are random
(`pretrained: none`): speed does not depend on them.
"""

from __future__ import annotations

import dataclasses

from stm_core.model.network import ModelConfig

_PAPER = {"backbone": "resnet50", "decoder_dim": 256, "fusion_dim": 64, "fusion_scale": "none", "similarity": "keys"}
RECIPE_MODELS = {  # (STM has no Fusion Cell: its fusion settings are the shared model: section's, unused)
    "stm": ModelConfig(kind="stm", norm="frozen_bn", **_PAPER),  # type: ignore[arg-type]
    "strmn": ModelConfig(kind="strmn", norm="group", **_PAPER),  # type: ignore[arg-type]
}
# STRMN's recipe memory: K = 5 slots (sec. 3.4.1), TBPTT segments of 10 frames, 5-frame pretraining clips.
RECIPE_STRMN_SLOTS = 5
RECIPE_STRMN_SEGMENT = 10
RECIPE_STRMN_PRETRAIN_FRAMES = 5


def recipe_model(kind: str, backbone: str | None = None) -> ModelConfig:
    """The recipe's network of `kind` ("stm" | "strmn"); `backbone` swaps only the backbone (CPU smoke runs)."""
    if kind not in RECIPE_MODELS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(RECIPE_MODELS)}")
    config = RECIPE_MODELS[kind]
    return dataclasses.replace(config, backbone=backbone) if backbone else config
