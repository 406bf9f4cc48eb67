"""Hand-made worker-loop settings for tests of the loop's parts, without a params file: the keys
every stage must give (steps, max_skip, data, data_format, init) filled in, the rest as a test names them."""

from __future__ import annotations

from typing import Any

from pipeline.train.data import DataSpec
from pipeline.train.loop_config import InputPool, LoopConfig
from pipeline.train.settings import RayParams, StageParams, StrmnParams
from stm_core.model.network import ModelConfig


def stage_params(**changes: Any) -> StageParams:
    return StageParams(**{"steps": 10, "max_skip": 0, "data": "data", "data_format": "davis", "init": "none",
                          **changes})


def plain_loss(**changes: Any) -> StageParams:
    """Cross-entropy over all pixels, no loss on the memory read."""
    return stage_params(**{"loss": "ce", "bootstrap_top_p": 0.15, "read_loss": 0.0, **changes})


def video_data(path: str, **changes: Any) -> DataSpec:
    """A local DAVIS-layout video set."""
    return DataSpec(**{"kind": "videos", "path": path, "format": "davis", "split": "train", "shuffle_buffer": 0,
                       "short_videos": "drop", "cache_mb": 0.0, **changes})


def loop_config(**changes: Any) -> LoopConfig:
    fields: dict[str, Any] = {
        "stage": "main", "model": ModelConfig(), "init": None, "train": stage_params(), "strmn": StrmnParams(),
        "seed": 0, "frames": 3, "per_worker_batch": 2, "data": video_data("videos"), "threads": 1,
        "pool": InputPool.of(RayParams())}
    return LoopConfig(**{**fields, **changes})
