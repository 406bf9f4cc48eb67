"""Training settings: the params sections `training` (what both stages share) with `pretrain` or
`train` over it, `strmn`, `ray` -> `TrainSettings`, and the Ray Train run name (a hash of everything
that shapes the result)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline import storage
from pipeline.params import (
    DEFAULT_PARAMS,
    OVER_SHARED,
    ParamsError,
    from_dict,
    in_project,
    load_params,
    section,
)
from pipeline.tracking import MlflowParams, project_root, workspace_root
from stm_core.memory.recurrent import I2M, STRMN_RULES
from stm_core.model.network import ModelConfig

log = logging.getLogger("pipeline.train")
STAGES = ("pretrain", "main")
RUN_ID_FILE = "mlflow_run_id"
FAULT_ENV = "STM_TRAIN_FAULT"  # "STEP:MARKER": one worker exits once at STEP (tests of fault tolerance)
STAGE_SECTIONS = {"pretrain": "pretrain", "main": "train"}  # --stage -> its params section (over OVER_SHARED's)
STAGE_KEYS = ("steps", "max_skip", "data", "data_format", "init")  # each stage's own: never shared


@dataclass(kw_only=True)
class StageParams:
    """One training stage: params section `training` with `pretrain` or `train` over it. The fields
    without a default (STAGE_KEYS) are each stage's own; the others default to `training`'s values."""

    steps: int  # optimizer steps in the stage
    batch_size: int = 4  # global batch (clips per step), split evenly across Ray workers
    lr: float = 5e-4  # Adam learning rate (the paper: 1e-5 from ImageNet weights on GPUs)
    lr_schedule: Literal["constant", "cosine", "plateau"] = "constant"  # after warm-up: fixed, cosine to 10%, or x0.1 on plateaus
    val_every: int = 0  # (plateau) steps between validation checks
    val_holdout: int = 0  # (plateau) last videos of the training split held out for validation (not trained on)
    val_clips: int = 8  # (plateau) held-out clips per validation check (fixed)
    plateau_factor: float = 0.1  # (plateau) learning-rate factor at each drop (the STRMN paper: 0.1)
    plateau_patience: int = 0  # (plateau) checks without a decrease before a drop (the paper: 0)
    plateau_min_scale: float = 0.0  # (plateau) the rate never drops below lr x this (0: no floor)
    warmup_steps: int = 10  # linear learning-rate warm-up steps
    weight_decay: float = 0.0  # Adam weight decay
    grad_clip: float = 0.0  # clip the gradient norm to this (0: off)
    loss: Literal["ce", "bootstrap"] = "ce"  # cross-entropy, or bootstrapped CE over the hardest pixels
    bootstrap_top_p: float = 0.15  # share of hardest pixels the bootstrapped CE averages
    read_loss: float = 0.3  # (STM) weight of a loss on the read: query pixels should read memory of their own label (not in the papers; 0: off)
    frames: int = 3  # frames per STM training clip (the paper: 3)
    crop: int = 96  # square training crop in pixels (the paper: 384); Parquet clips larger than it are cropped
    max_objects: int = 3  # objects per clip at most (a random subset of frame 0's objects)
    max_skip: int  # largest frame skip between sampled video frames (the paper: 25)
    skip_ramp: float = 0.5  # share of the steps over which max skip grows from 0 (curriculum)
    data: str  # Parquet clip folder or video dataset root ({model}: stm|strmn)
    data_format: Literal["parquet", "davis", "youtube-vos"]  # layout of `data`
    split: str = "train"  # video split (DAVIS ImageSets name / YouTube-VOS folder)
    init: str  # starting weights: none | pretrain (that stage's output for this model) | a path
    shuffle_buffer: int = 64  # Parquet rows in each worker's local shuffle buffer (0: no shuffle)
    materialize: bool | None = True  # load the input into Ray's object store first (the 2-CPU Ray Data + Train deadlock fix); null: only inputs under ray.materialize_max_mb
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 autocast on GPU, fp32 on CPU
    checkpoint_every: int = 20  # steps between checkpoints (and always at the end)
    num_to_keep: int = 2  # checkpoints kept in storage
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the stage fails
    log_every: int = 10  # steps between progress lines / MLflow metrics
    log_images_every: int = 30  # steps between prediction overlays logged to MLflow (0: never)

    def __post_init__(self):
        if self.read_loss < 0:
            raise ValueError(f"read_loss must be >= 0 (a loss weight; 0: off), got {self.read_loss}")


@dataclass
class StrmnParams:
    """How the STRMN model beside STM is trained (params section `strmn`)."""

    slots: int = 4  # K memory slots during the training unroll
    rule: str = "C"  # memory update rule during training: A | B | C | D | I2M (stm_core STRMN_RULES)
    norm: Literal["frozen_bn", "group"] = "group"  # backbone normalisation (the STRMN paper: GroupNorm)
    segment_length: int = 4  # TBPTT segment length T in frames (the paper: 10)
    pretrain_frames: int = 5  # frames per synthetic pretraining clip (the paper: 5)
    main_frames: int = 7  # frames per video clip in main training (the paper: 50)
    update: Literal["clip", "segment"] = "clip"  # one Adam step per clip batch, or per TBPTT segment (the paper)
    batch_size: int | None = 2  # global batch of the STRMN stages (null: the stage's batch_size)
    rules: list[str] = dataclasses.field(default_factory=lambda: list(STRMN_RULES))  # one main (fine-tuning) stage per rule (dvc foreach)
    pretrain_steps: int | None = 60  # optimizer steps of the shared STRMN pretraining (null: pretrain.steps)
    main_steps: int | None = 8  # optimizer steps of each per-rule main stage (null: train.steps)
    lr: float | None = None  # learning rate of the STRMN stages (null: the stage's lr; the paper: 1e-4)
    lr_schedule: str | None = None  # schedule of STRMN fine-tuning (null: train's)
    pretrain_lr_schedule: str | None = None  # schedule of STRMN pretraining (null: pretrain's; the paper: plateau)
    short_videos: Literal["drop", "repeat"] = "drop"  # fine-tuning videos shorter than main_frames: skipped or repeated
    continuous: bool = False  # main clips are consecutive frames (no skip), as the paper's 50-frame clips

    def __post_init__(self):
        bad = [r for r in [self.rule, *self.rules] if r not in STRMN_RULES]
        if bad or not self.rules:
            raise ValueError(f"rule and rules must name rules from {list(STRMN_RULES)}, got {bad or self.rules}")


@dataclass
class RayParams:
    """Ray resources (params section `ray`)."""

    num_workers: int = 0  # training workers (DDP ranks); 0 runs in-process without Ray workers
    use_gpu: bool = False  # one GPU per worker, NCCL; CPU workers use gloo
    cpus_per_worker: float = 1.0  # CPUs reserved per worker (also its torch threads)
    gpus_per_worker: float = 1.0  # GPUs per worker when use_gpu
    num_cpus: int | None = None  # CPUs of a local Ray instance (null: all); ignored on a cluster
    object_store_mb: int | None = None  # object store size of a local Ray instance in MiB (null: Ray's default)
    storage: str = "checkpoints"  # checkpoint storage: a path (relative to the project root) or a URI (s3://...)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # training workers over nodes
    data_min_actors: int = 1  # Ray Data actors (video clip samplers) at least; the pool grows with the cluster
    data_max_actors: int = 4  # Ray Data actors at most (and concurrent decode tasks of Parquet clips)
    data_cpus: float = 1.0  # CPUs each Ray Data task or actor of the training input reserves
    materialize_max_mb: float = 1024.0  # materialize: null computes inputs first only when their decoded clips fit in this
    eval_actors: int | None = None  # evaluation actors (null: as many as the cluster holds when evaluate starts, at least one)
    wait_for_nodes_s: float = 600.0  # on a cluster, how long evaluate waits for a node that fits one actor


@dataclass
class TrainSettings:
    stage: str
    kind: str
    model: ModelConfig
    stage_params: StageParams
    strmn: StrmnParams
    ray: RayParams
    mlflow: MlflowParams
    seed: int
    root: Path  # workspace: data, models, metrics, checkpoints (DVC's temp copy in queued experiments)
    tracking_root: Path  # where the local MLflow store lives ($DVC_ROOT: the parent repository)
    params_file: Path
    storage_root: str = ""  # params storage.root: the store every node reaches ("" on one machine)
    rule: str | None = None  # STRMN main stage of one rule (`--rule`): its own output folder
    cache_mb: float = 0.0  # params storage.cache_mb: node-local cache of store files per reading process

    @property
    def rule_suffix(self) -> str:
        return f"-{self.rule}" if self.rule else ""

    @property
    def prefix(self) -> str:
        return "strmn-" if self.kind == "strmn" else ""

    @property
    def model_out(self) -> Path:
        rule = [self.rule] if self.rule else []
        return self.root.joinpath("models", f"{self.prefix}{self.stage}", *rule, "model.pt")

    @property
    def metrics_out(self) -> Path:
        suffix = "-strmn" if self.kind == "strmn" else ""
        return self.root / "metrics" / f"train-{self.stage}{suffix}{self.rule_suffix}.json"

    @property
    def plot_out(self) -> Path:
        """The loss per step, for `dvc plots` (beside MLflow's curve)."""
        return self.root / "plots" / f"{self.metrics_out.stem}.csv"

    @property
    def frames(self) -> int:
        if self.kind == "strmn":
            return self.strmn.pretrain_frames if self.stage == "pretrain" else self.strmn.main_frames
        return self.stage_params.frames

    @property
    def batch_size(self) -> int:
        if self.kind == "strmn" and self.strmn.batch_size:
            return self.strmn.batch_size
        return self.stage_params.batch_size

    def data_path(self) -> Path | None:
        """The local copy of the training data (DVC's dependency); None for data at a URI (read there)."""
        data = self.stage_params.data.replace("{model}", self.kind)
        return None if storage.is_uri(data) else in_project(self.root, data)

    def data_location(self) -> str:
        """Where Ray workers read the training data: a URI when params give one or storage.root is set
        (the stage mirrors the local copy there), else the local path."""
        data = self.stage_params.data.replace("{model}", self.kind)
        if storage.is_uri(data):
            return data
        local = in_project(self.root, data)
        return storage.remote_mirror(self.storage_root, self.root, local) or str(local)

    def model_uri(self) -> str | None:
        """The trained model's copy in the store (storage.root), or None on one machine."""
        return storage.remote_mirror(self.storage_root, self.root, self.model_out)

    def init_path(self) -> Path | None:
        init = self.stage_params.init
        if init in ("", "none"):
            return None
        if init == "pretrain":
            return self.root / "models" / f"{self.prefix}pretrain" / "model.pt"
        return in_project(self.root, init)

    def storage(self) -> str:
        """Ray Train's storage: ray.storage as a URI, else under storage.root, else a local folder."""
        s = self.ray.storage
        if storage.is_uri(s):
            return s
        if self.storage_root and not Path(s).is_absolute():
            return storage.join(storage.check_uri(self.storage_root, "storage.root"), s)
        return str(in_project(self.root, s))


def shared_locations(s: TrainSettings) -> dict[str, str]:
    """What Ray workers on any node read or write: params key -> path or URI."""
    section_name = STAGE_SECTIONS[s.stage]
    return {f"{section_name}.data": s.data_location(), "ray.storage": s.storage()}


def stage_section(params: dict[str, Any], name: str) -> StageParams:
    """StageParams of section `name` (pretrain | train): `training`'s values with the section's over
    them. A stage may set any shared key for itself; its own keys (STAGE_KEYS) are never shared."""
    where, shared_name = params.get("__file__", DEFAULT_PARAMS), OVER_SHARED[name]
    shared, own = params.get(shared_name) or {}, params.get(name) or {}
    known = {f.name for f in dataclasses.fields(StageParams)}
    # each part checked on its own, so an error names the section that holds the key
    for key, raw in ((shared_name, shared), (name, own)):
        if not isinstance(raw, dict):
            raise ParamsError(f"{where}: {key}: expected a mapping, got {raw!r}")
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ParamsError(f"{where}: {key}: unknown key(s) {unknown}; known: {sorted(known)}")
    misplaced = sorted(set(shared) & set(STAGE_KEYS))
    if misplaced:
        raise ParamsError(f"{where}: {shared_name}: {misplaced} belong to each stage (set them under pretrain: "
                          "and train:), not to the shared keys")
    merged = dict(shared.items())  # items(), not **: a recording mapping (tests of dvc.yaml) sees these reads
    merged.update(own.items())
    return from_dict(StageParams, merged, f"{where}: {name} (over {shared_name})")


# The STRMN stages' settings, resolved in one place from params to the values a run uses: a STRMN
# stage starts from the stage's own section (`training:` under `pretrain:` / `train:`), then takes
# the `strmn:` keys that override it: `strmn.lr` (both stages), `strmn.pretrain_steps` and
# `strmn.pretrain_lr_schedule` (pretraining), `strmn.lr_schedule` (fine-tuning), and for the per-rule
# fine-tuning (`--rule R`, dvc.yaml's `train_strmn` foreach) `strmn.rule = R`, `strmn.main_steps`
# with its checkpoint interval and warm-up, and `strmn.continuous`. Every derived value is logged,
# and the driver logs the resolved settings as the run's params.
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


def settings(params_file: str | Path, stage: str, kind: str, rule: str | None = None) -> TrainSettings:
    if stage not in STAGES:
        raise ParamsError(f"unknown stage {stage!r}; choose one of {STAGES}")
    params = load_params(params_file)
    model_raw = dict(params.get("model") or {})
    if "kind" in model_raw:
        raise ParamsError(f"{params_file}: model.kind is not a setting; choose the model with --model stm|strmn")
    model = section({**params, "model": model_raw}, "model", ModelConfig)
    # The STM stages neither read nor depend on `strmn` (dvc.yaml lists only what each stage reads).
    strmn = section(params, "strmn", StrmnParams) if kind == "strmn" else StrmnParams()
    changes: dict[str, Any] = {"kind": kind}  # a plain str: ModelConfig checks it
    if kind == "strmn":
        changes["norm"] = strmn.norm
    model = dataclasses.replace(model, **changes)
    name = STAGE_SECTIONS[stage]
    seed = params.get("seed", 0)
    if not isinstance(seed, int):
        raise ParamsError(f"{params_file}: seed: expected an integer, got {seed!r}")
    stage_params = stage_section(params, name)
    if kind == "strmn":
        strmn, stage_params = resolve_strmn(params_file, stage, rule, strmn, stage_params)
    else:
        from pipeline.train.schedule import check_stage

        try:
            check_stage(stage_params, f"{params_file}: {name}")
        except ValueError as err:
            raise ParamsError(str(err)) from err
    if rule is not None and kind != "strmn":
        raise ParamsError(f"{params_file}: --rule applies to the STRMN main stage only (--stage main --model strmn)")
    return TrainSettings(stage, kind, model, stage_params, strmn, section(params, "ray", RayParams),
                         section(params, "mlflow", MlflowParams), seed, workspace_root(params_file),
                         project_root(params_file), Path(params_file),
                         storage.storage_root(params), rule,
                         section(params, "storage", storage.StorageParams).cache_mb)


def data_fingerprint(s: TrainSettings) -> str:
    data = s.stage_params.data.replace("{model}", s.kind)
    if storage.is_uri(data):  # no local copy: the store's listing
        return hashlib.sha256("\n".join(storage.list_files(data)).encode()).hexdigest()
    local = s.data_path()
    assert local is not None, f"{data}: not a URI, so it has a local path"
    return storage.fingerprint(local)


def run_name(s: TrainSettings, init: Path | None) -> str:
    """Same name <=> same training: re-running after a crash resumes, changed params start fresh."""
    recipe: dict[str, Any] = {
        "model": s.model.to_dict(), "stage": dataclasses.asdict(s.stage_params), "seed": s.seed,
        "frames": s.frames, "strmn": dataclasses.asdict(s.strmn) if s.kind == "strmn" else None,
        "data": data_fingerprint(s), "init": storage.fingerprint(init) if init else None}
    for key in ("checkpoint_every", "num_to_keep", "max_failures", "log_every", "log_images_every", "materialize"):
        recipe["stage"].pop(key)  # bookkeeping: changing it must not throw away a half-done run
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{s.prefix}{s.stage}-{digest}"


def atomic_json(path: Path, data: dict) -> None:
    from stm_core.data.io import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def remove_storage(location: str, name: str) -> None:
    if storage.is_uri(location):
        storage.delete_dir(storage.join(location, name))
    else:
        shutil.rmtree(Path(location) / name, ignore_errors=True)
