"""The Ray Train worker loop: a function of the typed `LoopConfig` (`pipeline.train.loop_config`),
built by `pipeline.train.driver` and handed over by Ray Train inside its `train_loop_config` dict.

Every rank runs `train_loop`. The model is wrapped in DDP (gloo on CPU, NCCL on GPU) through an
`nn.Module` whose forward is the training unroll (`pipeline.train.step`). The hot loop never syncs
with the host: the loss is summed on the device and read only when metrics are reported. Every
`checkpoint_every` steps all ranks call `ray.train.report` (a barrier) and rank 0 hands over a
checkpoint (`pipeline.train.checkpoints`); a restarted worker group resumes from it, and its input
starts at that step (nothing before it is made). With `lr_schedule: plateau` every rank measures
the same held-out clips (`plateau_setup`, `pipeline.train.schedule`).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.runguard import check_stop
from pipeline.train.checkpoints import (  # noqa: F401 - METRICS_FILE, STATE_FILE: the driver's names
    METRICS_FILE,
    STATE_FILE,
    latest_local_checkpoint,
    load_state,
    report_checkpoint,
    resume_step,
    rng_state,
    set_rng_state,
)
from pipeline.train.data import clips_per_second, collate, open_videos, overlay, split_holdout
from pipeline.train.faults import faulty_rank, inject_fault, node_id
from pipeline.train.input import ClipCollate
from pipeline.train.loop_config import LoopConfig
from pipeline.train.schedule import Plateau, check_plateau, parquet_validation_clips, validation_clips
from pipeline.train.step import Unroll, build_network, lr_at, make_train_step, precision  # noqa: F401
from stm_core.data.sampler import max_skip_schedule
from stm_core.precision import set_exact_fp32


def gather(obj, world: int) -> list:
    if world == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def data_batches(config: LoopConfig, rank: int, world: int, start: int, device: torch.device | str = "cpu") -> Iterator:
    """Endless (frames, masks, valid) batches for this rank from its Ray Data shard, prefetched and
    moved to `device` by Ray Data's iterator (uint8 frames and masks: a quarter of the bytes of float).

    Videos after a restart at step `start`: the input starts at the step Ray Train's record names
    (`resume_step`, read by the dataset factory before the workers start), normally `start` itself,
    so no clip of an earlier step is made. An in-process shard seeks to `start`. Should the input
    start earlier, every rank drops the same number of batches (not decided by each batch's `step`
    column: streaming_split gives the ranks equal row counts but not step-aligned batches, and a rank
    that skipped more would wait at Ray Data's epoch barrier while the others wait in the all-reduce).
    """
    import ray.train

    data, batch, resume = config.data, config.per_worker_batch, config.resume
    shard = ray.train.get_dataset_shard("train")
    shuffle = (data.shuffle_buffer or None) if data.kind == "parquet" else None
    to_skip = 0
    if data.kind == "videos":
        if hasattr(shard, "seek"):  # LocalShard: starts making clips at `start`
            shard.seek(start)
        else:
            if config.input_first_step is not None:  # the driver materialised the input from this step
                first = config.input_first_step
            else:  # the factory made it from the step of the run's record, as the worker group started
                first = resume_step(resume.storage_location, resume.run) if resume is not None else 0
            if first > start:
                raise RuntimeError(f"the input starts at step {first} but the checkpoint loaded is at step {start}")
            to_skip = start - first
    device = torch.device(device)
    epoch = 0
    while True:
        got = 0
        for columns in shard.iter_torch_batches(batch_size=batch, drop_last=True, device=device,
                                                pin_memory=device.type == "cuda", collate_fn=ClipCollate(),
                                                prefetch_batches=config.prefetch_batches,
                                                local_shuffle_buffer_size=shuffle,
                                                local_shuffle_seed=config.seed * 7919 + epoch * 31 + rank):
            got += 1
            if to_skip > 0:
                to_skip -= 1
                continue
            yield to_training(columns)
        if got == 0:
            raise ValueError(f"{data.path}: fewer clips than one batch of {batch} per worker x {world} workers")
        epoch += 1


def to_training(columns: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Columns (uint8 frames B x N x H x W x 3, masks B x N x H x W, n_objects B; on the training
    device) -> frames B x N x 3 x H x W float [0, 1], masks B x N x H x W long, valid B x O bool."""
    frames = columns["frames"].permute(0, 1, 4, 2, 3).float().div_(255.0)
    masks = columns["masks"].long()
    counts = columns["n_objects"].long()
    objects = max(1, int(counts.max())) if len(counts) else 1
    valid = torch.arange(1, objects + 1, device=counts.device)[None, :] <= counts[:, None]
    return frames, masks, valid


def plateau_setup(config: LoopConfig, device: torch.device, totals: dict) -> tuple[Plateau | None, list]:
    """The stage's Plateau (restored from a checkpoint's totals) and its held-out batches on `device`;
    (None, []) unless lr_schedule: plateau."""
    tp, data = config.train, config.data
    if tp.lr_schedule != "plateau":
        return None, []
    plateau = Plateau(factor=tp.plateau_factor, patience=tp.plateau_patience, min_scale=tp.plateau_min_scale)
    if "plateau" in totals:
        plateau.load_state_dict(totals["plateau"])
    if data.kind == "parquet":
        clips = parquet_validation_clips(data.path, tp.val_clips, tp.crop, tp.max_objects, config.seed)
    else:
        _, held = split_holdout(open_videos(data), tp.val_holdout)
        clips = validation_clips(held, tp.val_clips, config.frames, tp.crop, tp.max_objects, config.seed,
                                 data.short_videos)
    batch = max(1, config.per_worker_batch)
    batches = [tuple(t.to(device) for t in collate(clips[i:i + batch])) for i in range(0, len(clips), batch)]
    return plateau, batches


def train_loop(train_loop_config: dict) -> None:
    """Ray Train's worker loop. Rank 0 logs its node's system metrics (GPU too) into the run meanwhile."""
    import ray.train

    from pipeline import tracking

    config = LoopConfig.from_ray(train_loop_config)
    if ray.train.get_context().get_world_rank() == 0 and config.mlflow_run_id:
        with tracking.system_metrics(config.mlflow_uri, config.mlflow_run_id):
            _train(config)
    else:
        _train(config)


def _train(config: LoopConfig) -> None:
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tp = config.train
    torch.set_num_threads(config.threads)
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)  # same init on every rank (DDP broadcasts rank 0's anyway)
    random.seed(config.seed * 1000 + rank)
    rng = np.random.default_rng([config.seed, rank])

    network = build_network(config)
    amp_dtype, use_scaler = precision(tp.precision, device)
    if amp_dtype is None and device.type == "cuda":  # fp32 training (both papers) means IEEE fp32, not TF32
        set_exact_fp32()
    # channels_last on CPU too: one embedded STM step takes 0.82x the time (oneDNN's NHWC kernels).
    network = network.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    unroll = Unroll(network, tp, config.strmn)
    model = ray.train.torch.prepare_model(
        unroll, parallel_strategy_kwargs={"find_unused_parameters": network.config.kind == "strmn"})
    optimizer = torch.optim.Adam(network.parameters(), lr=tp.lr, weight_decay=tp.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    start = 0
    # running sums, carried in each checkpoint; "curve": [[step, loss], ...]
    totals: dict[str, Any] = {"clips": 0, "seconds": 0.0, "loss": float("nan"), "restarts": 0, "resumed_from": 0,
                              "curve": []}
    # In-process runs (local mode) get no checkpoint from Ray Train: theirs are on this disk.
    checkpoint = ray.train.get_checkpoint() or latest_local_checkpoint(config.local_checkpoints)
    if checkpoint is not None:
        state = load_state(checkpoint)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, totals = state["step"], {"curve": [], **state["totals"], "restarts": state["totals"]["restarts"] + 1,
                                        "resumed_from": state["step"]}
        if len(state["rng"]) == world:
            set_rng_state(state["rng"][rank], rng)
        else:  # different worker count: fresh, still deterministic streams
            rng = np.random.default_rng([config.seed, rank, start])
        if rank == 0:
            print(f"[train] resumed from the checkpoint at step {start} (restart {totals['restarts']})", flush=True)

    nodes = gather(node_id(), world)  # where each rank runs
    logger = None
    if rank == 0 and config.mlflow_run_id:
        from pipeline.tracking import RunLogger

        logger = RunLogger(config.mlflow_uri, config.mlflow_run_id)
        logger.tags({"ray_nodes": ",".join(sorted(set(nodes))), "ray_rank_nodes": ",".join(nodes)})
        if checkpoint is not None:
            logger.metrics({"resumed_from_step": start}, step=start)

    total = tp.steps
    skip = [max_skip_schedule(start, total, 0, tp.max_skip, tp.skip_ramp)]  # for the logs: the rows carry it
    batches = data_batches(config, rank, world, start, device)
    loss_sum = torch.zeros((), device=device)
    count, interval_start, waited = 0, time.perf_counter(), 0.0
    fault = config.fault
    fault_rank = faulty_rank(nodes, config.driver_node)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    train_step = make_train_step(model, network, optimizer, scaler, autocast, tp, config.strmn)
    plateau, val_batches = plateau_setup(config, device, totals)  # (None, []) unless lr_schedule: plateau
    model.train()
    for step in range(start, total):
        check_stop()  # SIGINT/SIGTERM in an in-process run: end between steps (Ray workers are killed)
        if fault is not None and step == fault.step and rank == fault_rank and not os.path.exists(fault.marker):
            inject_fault(fault.marker, rank, step)
        skip[0] = max_skip_schedule(step, total, 0, tp.max_skip, tp.skip_ramp)
        t_wait = time.perf_counter()
        frames, masks, valid = next(batches)  # on the device already; blocks only when the input is behind
        waited += time.perf_counter() - t_wait
        lr = lr_at(step, tp) * (plateau.scale if plateau is not None else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = train_step(frames, masks, valid)
        loss_sum += out.loss.detach()
        if plateau is not None and (step + 1) % tp.val_every == 0:
            error = check_plateau(plateau, unroll, val_batches, totals)
            if rank == 0:
                print(f"[train] step {step + 1} validation loss {error:.4f} lr x{plateau.scale:g}", flush=True)
        count += 1
        done = step + 1
        if done % tp.log_every and done % tp.checkpoint_every and done != total:
            continue
        # ---- report time: the only host syncs
        if world > 1:
            dist.all_reduce(loss_sum)
        loss = loss_sum.item() / (count * world)
        seconds = time.perf_counter() - interval_start
        clips = count * config.per_worker_batch * world
        totals.update(clips=totals["clips"] + clips, seconds=totals["seconds"] + seconds, loss=loss)
        totals["curve"].append([done, loss])  # the loss curve travels in the checkpoint, so a resumed run keeps it
        metrics = {"step": done, "loss": loss, "lr": lr, "clips_per_s": clips_per_second(clips, seconds),
                   "data_wait_share": waited / seconds if seconds > 0 else 0.0,  # rank 0's time blocked on input
                   "max_skip": skip[0], "clips_seen": totals["clips"]}
        if rank == 0:
            print(f"[train] step {done}/{total} loss {loss:.4f} lr {lr:.2e} {metrics['clips_per_s']:.2f} clips/s "
                  f"data wait {100 * metrics['data_wait_share']:.0f}% max_skip {skip[0]}", flush=True)
            if logger is not None:
                logger.metrics({k: v for k, v in metrics.items() if k != "step"}, step=done)
                if tp.log_images_every > 0 and (done % tp.log_images_every == 0 or done == total):
                    logger.image(sample_overlay(frames, masks, out.logits), f"overlays/step_{done:06d}.png")
        save = done % tp.checkpoint_every == 0 or done == total
        rngs = gather(rng_state(rng), world) if save else None
        if save and rank == 0:
            assert rngs is not None  # gathered because save
            report_checkpoint(metrics, network, optimizer, scaler, done, rngs, totals, config, world)
        else:
            ray.train.report(metrics)
        loss_sum.zero_()
        count, interval_start, waited = 0, time.perf_counter(), 0.0
    if start >= total:  # resumed a finished run: hand the final state back again for export
        rngs = gather(rng_state(rng), world)
        metrics = {"step": total, "loss": totals["loss"], "lr": lr_at(total - 1, tp), "clips_per_s": 0.0,
                   "max_skip": skip[0], "clips_seen": totals["clips"]}
        if rank == 0:
            report_checkpoint(metrics, network, optimizer, scaler, total, rngs, totals, config, world)
        else:
            ray.train.report(metrics)


def sample_overlay(frames: torch.Tensor, masks: torch.Tensor, logits: torch.Tensor) -> np.ndarray:
    """Clip 0 of the batch, its last frame: [frame + GT | frame + prediction] (uint8 H x 2W x 3)."""
    from stm_core.data.io import DAVIS_PALETTE

    frame = (frames[0, -1].detach().float().clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
    pred = logits[0, -1].detach().argmax(0).cpu().numpy()
    return overlay(frame, masks[0, -1].cpu().numpy(), pred, DAVIS_PALETTE)
