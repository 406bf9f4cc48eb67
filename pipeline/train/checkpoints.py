"""Checkpoint I/O of the training loop: what a checkpoint holds, writing and reporting it, finding
the newest one of an in-process run, loading one back, and the step a resumed run starts at.

A checkpoint folder `checkpoint_<step:06d>_r<restarts>` holds `state.pt` (model, optimizer, scaler,
step, every rank's RNG state, running totals) and `metrics.json` (the training summary, written
last); its metadata holds the step. Rank 0 writes it from memory straight into the run's storage
(no node-local copy: a checkpoint may be larger than a node's disk); in-process runs (num_workers
0) keep it in `local_checkpoints`.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.train.data import clips_per_second
from pipeline.train.loop_config import LoopConfig

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"
NAME = re.compile(r"checkpoint_(\d+)_r\d+$")


def rng_state(np_rng: np.random.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np_rng.bit_generator.state, "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict, np_rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np_rng.bit_generator.state = state["numpy"]
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(checkpoint) -> dict:
    """A Ray Train checkpoint's state.pt (tensors, numbers, strings: weights_only loads it), read
    from where the checkpoint lives."""
    return torch.load(io.BytesIO(checkpoint_file(checkpoint, STATE_FILE)), map_location="cpu", weights_only=True)


def step_of(name: str) -> int | None:
    """The step in a checkpoint folder name, or None when it is not one of ours."""
    m = NAME.search(name.rstrip("/"))
    return int(m.group(1)) if m else None


def resume_step(storage_location: str, run: str) -> int:
    """The step the run `run` resumes at: that of the newest checkpoint Ray Train has registered in
    its storage (the one a restarted or re-run worker group loads; Ray's public `Result.from_path`),
    read from the checkpoint's own metadata; 0 for a fresh run. Read before the worker group starts,
    so the input starts at that step and makes no clip before it. A checkpoint whose step cannot be
    read is an error, never a silent step 0."""
    from ray.train import Result

    from pipeline import storage

    if storage.is_uri(storage_location):
        fs, base = storage.filesystem(storage.join(storage_location, run))
        where = storage.join(storage_location, run)
    else:
        fs, base = None, str(Path(storage_location) / run)
        where = base
    try:
        result = Result.from_path(base, storage_filesystem=fs)
    except RuntimeError as err:  # no run folder, or no checkpoint reported in it yet: a fresh run
        if "doesn't exist" in str(err):
            return 0
        raise
    checkpoint = result.checkpoint
    if checkpoint is None:
        return 0
    step = checkpoint.get_metadata().get("step")
    if step is None:
        step = step_of(checkpoint.path)
    if step is None:
        raise RuntimeError(f"{where}: the newest checkpoint ({checkpoint.path}) records no step (metadata "
                           f"'step' or a checkpoint_<step> folder name)")
    return int(step)


def report_checkpoint(metrics: dict, network, optimizer, scaler, step: int, rngs: list, totals: dict,
                      config: LoopConfig, world: int) -> None:
    """Rank 0: write the state and report it. On Ray Train the files are written straight into the
    run's storage (from memory: a checkpoint may be larger than a node's disk) and reported where
    they are; in-process runs (num_workers 0) keep them in `local_checkpoints`."""
    import ray.train
    from ray.train import CheckpointUploadMode

    local = config.local_checkpoints
    name = f"checkpoint_{step:06d}_r{totals['restarts']}"
    files = state_files(network, optimizer, scaler, step, rngs, totals, config, world)
    if local:
        folder = Path(local) / name
        folder.mkdir(parents=True, exist_ok=True)
        for file, data in files.items():
            (folder / file).write_bytes(data)
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        checkpoint.set_metadata({"step": step})
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        for old in complete_checkpoints(local)[: -max(1, config.train.num_to_keep)]:  # Ray Train keeps its own
            shutil.rmtree(old, ignore_errors=True)
        return
    run = ray.train.get_context().get_storage()  # the run's folder in its storage, on Ray's filesystem
    path = f"{run.experiment_fs_path}/{name}"
    run.storage_filesystem.create_dir(path, recursive=True)
    for file, data in files.items():  # the summary last: a folder with it is complete
        with run.storage_filesystem.open_output_stream(f"{path}/{file}") as out:
            out.write(data)
    checkpoint = ray.train.Checkpoint(path=path, filesystem=run.storage_filesystem)
    checkpoint.set_metadata({"step": step})  # where a resumed run's input starts (resume_step)
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def checkpoint_file(checkpoint, name: str) -> bytes:
    """One file of a Ray Train checkpoint, read where it lives (never downloaded to the node's disk)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{name}") as f:
        return f.read()


def complete_checkpoints(local: str) -> list[Path]:
    """In-process checkpoints whose state and summary were both written (the summary goes last), oldest first."""
    folders = Path(local).glob("checkpoint_*") if Path(local).is_dir() else []
    return sorted(p for p in folders if (p / STATE_FILE).is_file() and (p / METRICS_FILE).is_file())


def latest_local_checkpoint(local: str | None):
    """The newest complete in-process checkpoint (a crashed stage resumes from it), or None."""
    import ray.train

    done = complete_checkpoints(local) if local else []
    return ray.train.Checkpoint.from_directory(str(done[-1])) if done else None


def state_files(network, optimizer, scaler, step: int, rngs: list, totals: dict, config: LoopConfig,
                world: int) -> dict[str, bytes]:
    """A checkpoint's files, in the order they are written: the state, then the training summary."""
    state = {"model": {k: v.detach().cpu() for k, v in network.state_dict().items()},
             "model_config": network.config.to_dict(), "kind": network.config.kind,
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step, "rng": rngs,
             "totals": totals}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    summary = {"stage": config.stage, "model": network.config.kind, "steps": step, "final_loss": totals["loss"],
               "clips": totals["clips"], "train_seconds": round(totals["seconds"], 3),
               "clips_per_s": clips_per_second(totals["clips"], totals["seconds"]),
               "restarts": totals["restarts"], "resumed_from": totals["resumed_from"],
               "global_batch": config.per_worker_batch * world, "workers": world,
               "curve": totals.get("curve", [])}
    return {STATE_FILE: buffer.getvalue(), METRICS_FILE: (json.dumps(summary, indent=2) + "\n").encode()}


def write_state(folder: str, network, optimizer, scaler, step: int, rngs: list, totals: dict,
                config: LoopConfig, world: int) -> None:
    for name, data in state_files(network, optimizer, scaler, step, rngs, totals, config, world).items():
        (Path(folder) / name).write_bytes(data)
