"""`LoopConfig`: what every Ray Train worker's `train_loop` gets, typed, built by the driver
(`pipeline.train.driver.loop_config`) from the stage's settings.

Ray Train takes `train_loop_config` as a dict, so the config travels as `{LOOP_KEY: config}`
(`for_ray`) and `train_loop` unwraps it first (`from_ray`). It is pickled to every worker, and its
`data` (`pipeline.train.data.DataSpec`) to the Ray Data actors that sample video clips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.train.data import DataSpec
from pipeline.train.settings import RayParams, StageParams, StrmnParams
from stm_core.model.network import ModelConfig

if TYPE_CHECKING:
    from ray import ObjectRef

LOOP_KEY = "loop"  # the one key of Ray Train's train_loop_config dict


@dataclass(frozen=True)
class InputPool:
    """Ray Data's pools for the training input (params `ray.data_*`)."""

    min_actors: int  # video clip samplers at least; Ray Data's autoscaler grows the pool as nodes join
    max_actors: int  # video clip samplers at most, and concurrent Parquet decode tasks
    materialize_max_mb: float  # materialize: null computes the input first only when its clips fit in this

    @classmethod
    def of(cls, ray: RayParams) -> InputPool:
        return cls(min_actors=ray.data_min_actors, max_actors=ray.data_max_actors,
                   materialize_max_mb=ray.materialize_max_mb)


@dataclass(frozen=True)
class Fault:
    """One worker exits once at `step` (tests of fault tolerance: `STEP:MARKER` in STM_TRAIN_FAULT)."""

    step: int  # the step at which the worker exits
    marker: str  # file written as it exits: a restarted worker group does not exit again

    @classmethod
    def parse(cls, text: str) -> Fault:
        step, marker = text.split(":", 1)
        return cls(step=int(step), marker=marker)


@dataclass(frozen=True)
class Resume:
    """Where Ray Train records the run's checkpoints: a restarted worker group's input starts at the
    step of the newest one (`pipeline.train.checkpoints.resume_step`)."""

    storage_location: str  # ray.storage: a path or a URI
    run: str  # the run's folder there (`pipeline.train.settings.run_name`)


@dataclass
class LoopConfig:
    """The worker loop's settings. Not frozen: the driver fills in the run's MLflow ids, fault,
    driver node, checkpoint folder and resume location after building it, and a materialised
    input records the step it starts at (`input_first_step`) before the trainer ships it."""

    stage: str  # pretrain | main: named in each checkpoint's summary
    model: ModelConfig  # the network to build when there are no initial weights
    init: dict | ObjectRef | None  # initial weights {model_config, state_dict}; a ref when workers fetch them
    train: StageParams  # the stage's optimisation, schedule, clip and checkpoint settings
    strmn: StrmnParams  # STRMN's unroll (rule, slots, TBPTT segments, update); unused by STM
    seed: int  # the run's seed: weights' init, RNG streams per rank, shuffle and clip seeds
    frames: int  # frames per training clip
    per_worker_batch: int  # clips per step on each rank (the global batch split over the workers)
    data: DataSpec  # where the clips come from
    threads: int  # torch threads per rank: one per reserved CPU, more makes OpenMP spin
    pool: InputPool  # Ray Data's pools for the input
    mlflow_uri: str = ""  # tracking URI rank 0 logs metrics to ("" with no run)
    mlflow_run_id: str = ""  # the stage's MLflow run ("": rank 0 logs nothing)
    fault: Fault | None = None  # a worker exits once (tests of fault tolerance)
    driver_node: str | None = None  # the driver's Ray node: the fault hits a rank on another one
    local_checkpoints: str | None = None  # in-process runs keep their checkpoints in this folder
    resume: Resume | None = None  # Ray Train's record of the run, read for the step the input starts at
    input_first_step: int | None = None  # set when the driver materialised the input: the step it starts at
    prefetch_batches: int = 2  # batches each rank's Ray Data iterator keeps ready

    def for_ray(self) -> dict[str, LoopConfig]:
        """Ray Train's train_loop_config."""
        return {LOOP_KEY: self}

    @staticmethod
    def from_ray(config: dict[str, Any]) -> LoopConfig:
        loop = config[LOOP_KEY]
        if not isinstance(loop, LoopConfig):
            raise TypeError(f"train_loop_config[{LOOP_KEY!r}] is a {type(loop).__name__}, not a LoopConfig")
        return loop


def holdout(train: StageParams) -> int:
    """Videos held out of training: only a plateau stage validates (and so holds any out)."""
    return train.val_holdout if train.lr_schedule == "plateau" else 0
