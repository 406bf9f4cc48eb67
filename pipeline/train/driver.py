"""The driver side of `stm train`: MLflow run, Ray Train `TorchTrainer`, and the DVC outputs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline import storage, tracking
from pipeline.runguard import RunLock, Stopped, call_interruptibly
from pipeline.train import registry, runs
from pipeline.train.checkpoints import METRICS_FILE, checkpoint_file, load_state
from pipeline.train.data import DataSpec
from pipeline.train.input import DatasetFactory
from pipeline.train.local_shard import LocalShard
from pipeline.train.loop import train_loop
from pipeline.train.loop_config import Fault, InputPool, LoopConfig, Resume, holdout
from pipeline.train.settings import (
    RUN_ID_FILE,
    TrainSettings,
    atomic_json,
    data_fingerprint,
    remove_storage,
    run_name,
    shared_locations,
)
from stm_core.data.io import atomic_write_bytes
from stm_core.model.checkpoint import load_checkpoint, save_checkpoint
from stm_core.model.network import ModelConfig, STMNetwork

if TYPE_CHECKING:
    import ray

log = logging.getLogger("pipeline.train")


# ----------------------------------------------------------------- run id beside the checkpoints
def _read_text(location: str, rel: str) -> str | None:
    if storage.is_uri(location):
        try:
            return storage.read_bytes(storage.join(location, rel)).decode().strip()
        except FileNotFoundError:
            return None
    p = Path(location) / rel
    return p.read_text().strip() if p.is_file() else None


def _write_text(location: str, rel: str, text: str) -> None:
    if storage.is_uri(location):
        storage.write_bytes(storage.join(location, rel), text.encode())
        return
    atomic_write_bytes(Path(location) / rel, (text + "\n").encode())


def mlflow_run(s: TrainSettings, uri: str, storage: str, name: str, params: dict) -> tuple[str, bool, str | None]:
    """-> (run id, re-attached?, parent run id). The id is stored beside the checkpoints, so a resumed
    training run keeps logging into the run that holds the first part of its loss curve. An STRMN
    rule's fine-tuning runs under the one parent run of all rules (pipeline/train/runs.py)."""
    rel = f"{name}/{RUN_ID_FILE}"
    run_id = _read_text(storage, rel)
    tags = {**tracking.standard_tags(s.root, "pretrain" if s.stage == "pretrain" else "train"),
            "model": s.kind, "stage": s.stage, "ray_run": name}
    parent = (runs.rule_parent(uri, s.mlflow.experiment, runs.rule_group(params, s.init_path()), tags)
              if s.rule else None)
    if run_id and tracking.run_exists(uri, run_id):
        tracking.reattach_run(uri, run_id)
        return run_id, True, parent
    tags.update({"rule": s.rule, "mlflow.parentRunId": parent} if parent and s.rule else {})
    run_id = tracking.create_run(uri, s.mlflow.experiment, f"train-{s.prefix}{s.stage}{s.rule_suffix}", params, tags)
    _write_text(storage, rel, run_id)
    runs.log_dataset(uri, run_id, s.data_location(), data_fingerprint(s))
    return run_id, False, parent


# ----------------------------------------------------------------- config for the workers
def in_process_threads(num_cpus: int | None) -> int:
    """Torch threads of an in-process run: the CPUs this process may use, at most `ray.num_cpus`.
    Its clips are made in the same process between steps (LocalShard), or by Ray Data before
    training starts (`materialize`, the CPU default), so nothing else competes for the cores."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(available, int(num_cpus)) if num_cpus else available)


def loop_config(s: TrainSettings, world: int, init_payload: dict | ray.ObjectRef[dict] | None,
                data_path: str) -> LoopConfig:
    """The worker loop's settings for `world` ranks; the run's MLflow ids, fault, driver node,
    checkpoint folder and resume location are filled in by `train` once known."""
    sp = s.stage_params
    per_worker = max(1, s.batch_size // world)
    data = DataSpec(kind="parquet" if sp.data_format == "parquet" else "videos", path=data_path,
                    format=sp.data_format, split=sp.split, shuffle_buffer=sp.shuffle_buffer,
                    short_videos=s.strmn.short_videos, cache_mb=s.cache_mb)
    # One torch thread per reserved CPU: more threads than cores makes OpenMP spin and crawl.
    # In-process (num_workers 0) the driver's own process trains: it gets this machine's CPUs.
    threads = max(1, int(s.ray.cpus_per_worker)) if s.ray.num_workers > 0 else in_process_threads(s.ray.num_cpus)
    return LoopConfig(stage=s.stage, model=s.model, init=init_payload, train=sp, strmn=s.strmn, seed=s.seed,
                      frames=s.frames, per_worker_batch=per_worker, data=data, threads=threads,
                      pool=InputPool.of(s.ray))


def init_payload(path: Path | None, kind: str) -> dict | None:
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: initial weights not found (run the pretrain stage for --model {kind} first, "
                                "or set train.init: none)")
    network = load_checkpoint(path)
    if network.config.kind != kind:
        raise ValueError(f"{path}: holds a {network.config.kind} model, but --model {kind} was asked for")
    return {"model_config": network.config.to_dict(), "state_dict": network.state_dict()}


def training_data(s: TrainSettings) -> str:
    """What the exported model has seen, for the report's choice of published figure to compare with."""
    sp = s.stage_params
    this = "synthetic clips from static images" if sp.data_format == "parquet" else f"{sp.data_format} videos {sp.data}"
    if sp.init in ("none", "", None):
        return this
    init = s.root / "models" / f"{s.prefix}pretrain" / "model.pt" if sp.init == "pretrain" else Path(sp.init)
    try:
        before = torch.load(init, map_location="cpu", weights_only=True).get("training_data", "")
    except Exception:  # noqa: BLE001 - provenance is informative; training already succeeded
        before = ""
    return f"{before or init} + {this}"


# What metrics/train-*.json keeps for `dvc exp show`: the few numbers a user compares. The full
# summary (restarts, seconds, batch, ...) goes to the MLflow run as training_summary.json.
DVC_TRAIN_METRICS = ("final_loss", "clips_per_s", "steps")
VIDEO_COUNTS = ("videos", "short_videos", "dropped_videos")  # video stages: shorter than a clip, never seen


def loss_curve_csv(curve: list) -> bytes:
    """plots/train-*.csv: `step,loss`, one row per logged step (dvc plots: x=step, y=loss)."""
    rows = "".join(f"{int(step)},{float(loss):.6g}\n" for step, loss in curve)
    return f"step,loss\n{rows}".encode()


def export(result_checkpoint, s: TrainSettings) -> tuple[dict, STMNetwork]:
    """Final checkpoint -> models/.../model.pt (state dict + config, weights_only-safe); returns the
    training summary (its loss curve included) and the trained network."""
    state = load_state(result_checkpoint)  # read where it lives: no copy on the driver's disk
    metrics = json.loads(checkpoint_file(result_checkpoint, METRICS_FILE))
    network = STMNetwork(ModelConfig(**{**state["model_config"], "pretrained": "none"}))
    network.load_state_dict(state["model"])
    save_checkpoint(s.model_out, network, step=int(state["step"]), training_data=training_data(s))
    return metrics, network


def storage_args(location: str) -> dict:
    """RunConfig storage: a URI goes with its filesystem (the S3 endpoint travels with it)."""
    if storage.is_uri(location):
        fs, path = storage.filesystem(location)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": location}


def write_dvc_outputs(s: TrainSettings, summary: dict) -> None:
    """The stage's small outputs: metrics (three numbers) and the loss curve, each atomic."""
    from stm_core.data.io import atomic_write_bytes

    atomic_write_bytes(s.plot_out, loss_curve_csv(summary.get("curve", [])))
    atomic_json(s.metrics_out, {**{k: round(float(summary[k]), 6) if k != "steps" else int(summary[k])
                                   for k in DVC_TRAIN_METRICS},
                                **{k: int(summary[k]) for k in VIDEO_COUNTS if k in summary}})


def runs_locally(s: TrainSettings) -> bool:
    """In-process (num_workers 0) on this machine, with no cluster (RAY_ADDRESS) and local storage
    and data: the loop needs no Ray instance. Anything else goes through Ray (Data and Train)."""
    if s.ray.num_workers > 0 or os.environ.get("RAY_ADDRESS"):
        return False
    return not storage.is_uri(s.storage()) and not storage.is_uri(s.data_location())


# ----------------------------------------------------------------- the stage
def train(s: TrainSettings, fresh: bool = False, fault: str = "") -> int:
    sp = s.stage_params
    data_path, init_path, location = s.data_path(), s.init_path(), s.storage()
    if data_path is not None and not data_path.exists():  # None: data at a URI, read from there
        raise FileNotFoundError(f"{data_path}: training data not found (stage {s.stage}, data_format {sp.data_format})")
    local = runs_locally(s)  # in-process on this machine: Ray Train's local mode, no Ray instance to start
    name = run_name(s, init_path)
    lock = RunLock(location, name, f"train --stage {s.stage} --model {s.kind}{' --rule ' + s.rule if s.rule else ''}")
    lock.acquire()  # one writer per run: a second `stm train` of this run is refused here
    try:
        return _train_locked(s, name, local, fresh, fault)
    finally:
        lock.release()


def _train_locked(s: TrainSettings, name: str, local: bool, fresh: bool, fault: str) -> int:
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.cluster import alive_nodes, init_ray, require_shared, resolve_tracking_uri, shutdown_ray

    sp, rp = s.stage_params, s.ray
    data_path, init_path = s.data_path(), s.init_path()
    data_location, location = s.data_location(), s.storage()
    uri = tracking.tracking_uri(s.tracking_root, s.mlflow.tracking_uri)
    started_ray = not local and not ray.is_initialized()
    if not local:
        init_ray(num_cpus=rp.num_cpus, object_store_memory=rp.object_store_mb * 2**20 if rp.object_store_mb else None)
    try:
        if not local:
            nodes = alive_nodes()
            require_shared("train", shared_locations(s), nodes)
            uri = resolve_tracking_uri(uri, nodes)
        if storage.is_uri(data_location) and data_location != s.stage_params.data.replace("{model}", s.kind):
            assert data_path is not None  # the params name a local copy: the store mirrors it
            if storage.publish(data_path, data_location):  # the local DVC copy -> the store, when it changed
                log.info("[train] mirrored %s to %s", data_path, data_location)
    except BaseException:
        if started_ray:
            shutdown_ray()
        raise
    if fresh:
        remove_storage(location, name)
    params = {"model": s.model.to_dict(), s.stage: dataclasses.asdict(sp), "ray": dataclasses.asdict(rp),
              "seed": s.seed, "frames": s.frames, **({"strmn": dataclasses.asdict(s.strmn)} if s.kind == "strmn" else {})}
    run_id, reattached, parent = mlflow_run(s, uri, location, name, params)
    runs.set_parent_status(uri, parent, "RUNNING")
    log.info("[train] %s %s: run %s (%s), MLflow run %s (%s) at %s", s.kind, s.stage, name,
             location, run_id, "re-attached" if reattached else "new", uri)

    world = max(1, rp.num_workers)
    per_worker = max(1, s.batch_size // world)
    if per_worker * world != s.batch_size:
        log.warning("[train] global batch %d does not split over %d workers: using %d = %d x %d",
                    s.batch_size, world, per_worker * world, world, per_worker)
    log.info("[train] global batch %d = %d workers x %d clips per worker", per_worker * world, world, per_worker)

    status = "FAILED"
    try:
        weights = init_payload(init_path, s.kind)
        payload: dict | ray.ObjectRef[dict] | None = weights
        if weights is not None and rp.num_workers > 0:
            payload = ray.put(weights)  # workers on other nodes get it from the object store
        config = loop_config(s, world, payload, data_location)
        config.mlflow_uri, config.mlflow_run_id = uri, run_id
        counts = {}
        if config.data.kind == "videos":
            from pipeline.train.schedule import video_counts

            counts = video_counts(config.data, s.frames, holdout(config.train), s.strmn.short_videos)
            log.info("[train] %d training videos, %d shorter than %d annotated frames (%s: %d never seen)",
                     counts["videos"], counts["short_videos"], s.frames, s.strmn.short_videos,
                     counts["dropped_videos"])
        config.driver_node = None if local else ray.get_runtime_context().get_node_id()
        if rp.num_workers == 0:  # in-process: Ray Train does not persist checkpoints, keep them here
            config.local_checkpoints = None if storage.is_uri(location) else str(Path(location) / name / "local")
        if fault:
            config.fault = Fault.parse(fault)
        # Ray Data streams from the store, its pools sized by ray.data_*; a resumed run's input starts
        # at its step (the factory runs as each worker group starts). materialize: null computes only
        # small inputs first (a 2-CPU machine whose training workers take every CPU needs that).
        if not local:
            config.resume = Resume(storage_location=location, run=name)
        train_input: object  # a Ray Data Dataset or its factory; in process, a LocalShard in its place
        if local:
            train_input = LocalShard(config, sp.steps, per_worker * world)
        else:
            factory = DatasetFactory(config, sp.steps, per_worker * world, sp.materialize, rp.data_cpus)
            train_input = factory.materialized_now() or factory
        datasets: dict[str, Any] = {"train": train_input}  # Any: a LocalShard is used as a Dataset, not one
        resources = {"CPU": rp.cpus_per_worker, **({"GPU": rp.gpus_per_worker} if rp.use_gpu else {})}
        trainer = TorchTrainer(
            train_loop, train_loop_config=config.for_ray(), datasets=datasets,
            scaling_config=ScalingConfig(num_workers=rp.num_workers, use_gpu=rp.use_gpu,
                                         resources_per_worker=resources if rp.num_workers > 0 else None,
                                         placement_strategy=rp.placement_strategy),
            run_config=RunConfig(name=name, **storage_args(location),
                                 failure_config=FailureConfig(max_failures=sp.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=sp.num_to_keep)))
        t0 = time.perf_counter()
        try:  # in a helper thread: SIGINT/SIGTERM reach this thread, not Ray Train's own SIGINT handler
            result = call_interruptibly(trainer.fit, wait_after_stop=2.0)  # then the process exits under it
        except Stopped as stop:
            log.error("[train] %s %s stopped (%s); its checkpoints stay in %s/%s: run the same command again to "
                      "resume", s.kind, s.stage, stop, location, name)
            status = "KILLED"
            started_ray = started_ray or ray.is_initialized()  # leave the cluster too: the job's workers end with it
            return stop.exit_code
        except ray.train.TrainingFailedError as err:
            log.error("[train] %s %s failed (max_failures=%d reached): %s\n[train] run the same command again "
                      "to resume from the last checkpoint in %s/%s", s.kind, s.stage, sp.max_failures,
                      str(err).splitlines()[0] if str(err) else type(err).__name__, location, name)
            return 1
        if result.checkpoint is None:
            raise RuntimeError(f"training run {name} ended without a checkpoint (error: {result.error})")
        metrics, network = export(result.checkpoint, s)
        metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
        metrics.update(counts)
        write_dvc_outputs(s, metrics)
        checkpoints = storage.join(location, name) if storage.is_uri(location) else str(Path(location) / name)
        registry.log_and_register(uri, run_id, network, s, checkpoints, params)
        model_uri = s.model_uri()
        if model_uri:  # other nodes (evaluation tasks, the next stage) read the model from the store
            storage.write_bytes(model_uri, s.model_out.read_bytes())
            storage.write_bytes(storage.join(model_uri.rsplit("/", 1)[0], registry.MODEL_INFO),
                                (s.model_out.parent / registry.MODEL_INFO).read_bytes())
        client = tracking.client(uri)
        client.log_dict(run_id, {k: v for k, v in metrics.items() if k != "curve"}, "training_summary.json")
        client.log_artifact(run_id, str(s.plot_out))
        tracking.RunLogger(uri, run_id).metrics({"final_loss": metrics["final_loss"],
                                                 "train_clips_per_s": metrics["clips_per_s"]}, step=metrics["steps"])
        log.info("[train] done: %d steps, final loss %.4f, %.2f clips/s, %d restart(s); wrote %s and %s",
                 metrics["steps"], metrics["final_loss"], metrics["clips_per_s"], metrics["restarts"],
                 s.model_out, s.metrics_out)
        status = "FINISHED"
        return 0
    except Stopped:
        status = "KILLED"
        raise
    finally:
        tracking.finish_run(uri, run_id, status)
        runs.set_parent_status(uri, parent, status)
        if started_ray:
            shutdown_ray()
