"""The driver side of `stm train`: MLflow run, Ray Train `TorchTrainer`, and the DVC outputs."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from pipeline import tracking
from pipeline.train.loop import METRICS_FILE, STATE_FILE, train_loop
from pipeline.train.settings import RUN_ID_FILE, TrainSettings, atomic_json, remove_storage, run_name
from stm_core.model.checkpoint import load_checkpoint, save_checkpoint
from stm_core.model.network import ModelConfig, STMNetwork

log = logging.getLogger("pipeline.train")


# ----------------------------------------------------------------- run id beside the checkpoints
def _read_text(storage: str, rel: str) -> str | None:
    if "://" in storage:
        import pyarrow.fs

        fs, base = pyarrow.fs.FileSystem.from_uri(storage)
        try:
            with fs.open_input_stream(f"{base}/{rel}") as f:
                return f.read().decode().strip()
        except (FileNotFoundError, OSError):
            return None
    p = Path(storage) / rel
    return p.read_text().strip() if p.is_file() else None


def _write_text(storage: str, rel: str, text: str) -> None:
    if "://" in storage:
        import pyarrow.fs

        fs, base = pyarrow.fs.FileSystem.from_uri(storage)
        fs.create_dir(f"{base}/{Path(rel).parent}", recursive=True)
        with fs.open_output_stream(f"{base}/{rel}") as f:
            f.write(text.encode())
        return
    p = Path(storage) / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(p)


def mlflow_run(s: TrainSettings, uri: str, storage: str, name: str, params: dict) -> tuple[str, bool]:
    """-> (run id, re-attached?). The id is stored beside the checkpoints, so a resumed training run
    keeps logging into the run that holds the first part of its loss curve."""
    rel = f"{name}/{RUN_ID_FILE}"
    run_id = _read_text(storage, rel)
    if run_id and tracking.run_exists(uri, run_id):
        tracking.reattach_run(uri, run_id)
        return run_id, True
    tags = {**tracking.standard_tags(s.root, "pretrain" if s.stage == "pretrain" else "train"),
            "model": s.kind, "stage": s.stage, "ray_run": name}
    run_id = tracking.create_run(uri, s.mlflow.experiment, f"train-{s.prefix}{s.stage}{s.rule_suffix}", params, tags)
    _write_text(storage, rel, run_id)
    return run_id, False


# ----------------------------------------------------------------- config for the workers
def loop_config(s: TrainSettings, world: int, init_payload, data_path: Path) -> dict:
    sp = s.stage_params
    per_worker = max(1, s.batch_size // world)
    data = {"kind": "parquet" if sp.data_format == "parquet" else "videos", "path": str(data_path),
            "format": sp.data_format, "split": sp.split, "shuffle_buffer": sp.shuffle_buffer}
    # One torch thread per reserved CPU: more threads than cores makes OpenMP spin and crawl.
    threads = max(1, int(s.ray.cpus_per_worker))
    return {"stage": s.stage, "model": s.model.to_dict(), "init": init_payload, "train": dataclasses.asdict(sp),
            "strmn": dataclasses.asdict(s.strmn), "seed": s.seed, "frames": s.frames, "per_worker_batch": per_worker,
            "data": data, "threads": threads, "mlflow": {"uri": "", "run_id": ""}, "fault": None}


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


def loss_curve_csv(curve: list) -> bytes:
    """plots/train-*.csv: `step,loss`, one row per logged step (dvc plots: x=step, y=loss)."""
    rows = "".join(f"{int(step)},{float(loss):.6g}\n" for step, loss in curve)
    return f"step,loss\n{rows}".encode()


def export(result_checkpoint, s: TrainSettings) -> dict:
    """Final checkpoint -> models/.../model.pt (state dict + config, weights_only-safe); returns the
    training summary (its loss curve included)."""
    with result_checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
        metrics = json.loads((Path(folder) / METRICS_FILE).read_text())
    network = STMNetwork(ModelConfig(**{**state["model_config"], "pretrained": "none"}))
    network.load_state_dict(state["model"])
    save_checkpoint(s.model_out, network, step=int(state["step"]), training_data=training_data(s))
    return metrics


def write_dvc_outputs(s: TrainSettings, summary: dict) -> None:
    """The stage's small outputs: metrics (three numbers) and the loss curve, each atomic."""
    from stm_core.data.io import atomic_write_bytes

    atomic_write_bytes(s.plot_out, loss_curve_csv(summary.get("curve", [])))
    atomic_json(s.metrics_out, {k: round(float(summary[k]), 6) if k != "steps" else int(summary[k])
                                for k in DVC_TRAIN_METRICS})


# ----------------------------------------------------------------- the stage
def train(s: TrainSettings, fresh: bool = False, fault: str = "") -> int:
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.cluster import init_ray, shutdown_ray

    sp, rp = s.stage_params, s.ray
    data_path, init_path = s.data_path(), s.init_path()
    if not data_path.exists():
        raise FileNotFoundError(f"{data_path}: training data not found (stage {s.stage}, data_format {sp.data_format})")
    storage, name = s.storage(), run_name(s, init_path)
    if fresh:
        remove_storage(storage, name)
    uri = tracking.tracking_uri(s.tracking_root, s.mlflow.tracking_uri)
    params = {"model": s.model.to_dict(), s.stage: dataclasses.asdict(sp), "ray": dataclasses.asdict(rp),
              "seed": s.seed, "frames": s.frames, **({"strmn": dataclasses.asdict(s.strmn)} if s.kind == "strmn" else {})}
    run_id, reattached = mlflow_run(s, uri, storage, name, params)
    log.info("[train] %s %s: run %s (%s), MLflow run %s (%s) at %s", s.kind, s.stage, name,
             storage, run_id, "re-attached" if reattached else "new", uri)

    world = max(1, rp.num_workers)
    per_worker = max(1, s.batch_size // world)
    if per_worker * world != s.batch_size:
        log.warning("[train] global batch %d does not split over %d workers: using %d = %d x %d",
                    s.batch_size, world, per_worker * world, world, per_worker)
    log.info("[train] global batch %d = %d workers x %d clips per worker", per_worker * world, world, per_worker)

    started_ray = not ray.is_initialized()
    init_ray(num_cpus=rp.num_cpus, object_store_memory=rp.object_store_mb * 2**20 if rp.object_store_mb else None)
    status = "FAILED"
    try:
        payload = init_payload(init_path, s.kind)
        if payload is not None and rp.num_workers > 0:
            payload = ray.put(payload)  # workers on other nodes get it from the object store
        config = loop_config(s, world, payload, data_path)
        config["mlflow"] = {"uri": uri, "run_id": run_id}
        if rp.num_workers == 0:  # in-process: Ray Train does not persist checkpoints, keep them here
            config["local_checkpoints"] = str(Path(storage) / name / "local") if "://" not in storage else None
        if fault:
            step, marker = fault.split(":", 1)
            config["fault"] = {"step": int(step), "marker": marker}
        datasets = {}
        if config["data"]["kind"] == "parquet":
            ray.data.DataContext.get_current().enable_progress_bars = False  # log lines, not bars in DVC logs
            ds = ray.data.read_parquet(str(data_path), file_extensions=["parquet"])
            # Ray Data needs CPUs of its own; on a 2-CPU machine the training workers take them all
            # and a streaming read never gets scheduled. Reading everything first avoids that.
            datasets["train"] = ds.materialize() if sp.materialize else ds
        resources = {"CPU": rp.cpus_per_worker, **({"GPU": rp.gpus_per_worker} if rp.use_gpu else {})}
        trainer = TorchTrainer(
            train_loop, train_loop_config=config, datasets=datasets or None,
            scaling_config=ScalingConfig(num_workers=rp.num_workers, use_gpu=rp.use_gpu,
                                         resources_per_worker=resources if rp.num_workers > 0 else None),
            run_config=RunConfig(name=name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=sp.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=sp.num_to_keep)))
        t0 = time.perf_counter()
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as err:
            log.error("[train] %s %s failed (max_failures=%d reached): %s\n[train] run the same command again "
                      "to resume from the last checkpoint in %s/%s", s.kind, s.stage, sp.max_failures,
                      str(err).splitlines()[0] if str(err) else type(err).__name__, storage, name)
            return 1
        if result.checkpoint is None:
            raise RuntimeError(f"training run {name} ended without a checkpoint (error: {result.error})")
        metrics = export(result.checkpoint, s)
        metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
        write_dvc_outputs(s, metrics)
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
    finally:
        tracking.finish_run(uri, run_id, status)
        if started_ray:
            shutdown_ray()
