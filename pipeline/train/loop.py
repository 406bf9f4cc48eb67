"""The Ray Train worker loop: a plain function of a config dict (built by `pipeline.train.driver`).

Every rank runs `train_loop(config)`. The model is wrapped in DDP (gloo on CPU, NCCL on GPU) through
an `nn.Module` whose forward is the whole training unroll, so DDP sees one forward per backward.
The hot loop never syncs with the host: the loss is summed on the device and read only when
metrics are reported. Every `checkpoint_every` steps all ranks call `ray.train.report` (a
barrier) and rank 0 hands over a checkpoint (model, optimizer, scaler, step, every rank's RNG
state); a restarted worker group resumes from it and continues the step count.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.train.data import clips_per_second, overlay
from pipeline.train.schedule import check_plateau, plateau_setup
from stm_core.data.sampler import max_skip_schedule
from stm_core.model.network import ModelConfig, STMNetwork
from stm_core.training import UnrollOutput, unroll_stm

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"


class Unroll(nn.Module):
    """DDP wraps this: forward = one training unroll of `network` over a batch of clips."""

    def __init__(self, network: STMNetwork, train: dict, strmn: dict):
        super().__init__()
        self.network, self.settings, self.strmn = network, train, strmn

    def forward(self, frames: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> UnrollOutput:
        kw = {"loss": self.settings["loss"], "top_p": self.settings["bootstrap_top_p"]}
        if self.network.config.kind == "strmn":
            from stm_core.training import unroll_strmn

            return unroll_strmn(self.network, frames, masks, valid, rule=self.strmn["rule"],
                                slots=self.strmn["slots"], segment_length=self.strmn["segment_length"], **kw)
        return unroll_stm(self.network, frames, masks, valid, read_weight=self.settings.get("read_loss", 0.0), **kw)


def lr_at(step: int, train: dict) -> float:
    """Linear warm-up, then constant (the paper) or cosine decay to 10%."""
    base, warm, total = train["lr"], train["warmup_steps"], train["steps"]
    if warm > 0 and step < warm:
        return base * (step + 1) / warm
    if train["lr_schedule"] == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return base * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress))))
    return base


def precision(config: dict, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """-> (autocast dtype or None, use GradScaler). auto: bf16 on GPUs that have it, fp16 on older
    GPUs, fp32 on CPU (bf16 autocast is slower than fp32 on small CPUs)."""
    choice = config["train"]["precision"]
    if choice == "auto":
        if device.type != "cuda":
            return None, False
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}[choice]


def build_network(config: dict) -> STMNetwork:
    init = config.get("init")
    if init is not None:  # main training: the pretrained weights, shipped through the object store
        import ray

        payload = ray.get(init) if isinstance(init, ray.ObjectRef) else init
        network = STMNetwork(ModelConfig(**{**payload["model_config"], "pretrained": "none"}))
        network.load_state_dict(payload["state_dict"])
        return network
    return STMNetwork(ModelConfig(**config["model"]))


def rng_state(np_rng: np.random.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np_rng.bit_generator.state, "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict, np_rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np_rng.bit_generator.state = state["numpy"]
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather(obj, world: int) -> list:
    if world == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def data_batches(config: dict, rank: int, world: int, start: int) -> Iterator:
    """Endless (frames, masks, valid) CPU batches for this rank from its Ray Data shard, prefetched.

    After a restart at step `start`, every rank skips exactly `start` video batches (the steps the
    checkpoint holds). The count must be the same on every rank, not decided by each batch's `step`
    column: streaming_split gives the ranks equal row counts but not step-aligned batches, and a
    rank that skipped more would run out first and wait at Ray Data's epoch barrier while the
    others wait for it in the gradient all-reduce (a deadlock).
    """
    import ray.train

    data, batch = config["data"], config["per_worker_batch"]
    shard = ray.train.get_dataset_shard("train")
    shuffle = (data["shuffle_buffer"] or None) if data["kind"] == "parquet" else None
    to_skip = start if data["kind"] == "videos" else 0
    epoch = 0
    while True:
        got = 0
        for columns in shard.iter_torch_batches(batch_size=batch, drop_last=True, device="cpu",
                                                prefetch_batches=config.get("prefetch_batches", 2),
                                                local_shuffle_buffer_size=shuffle,
                                                local_shuffle_seed=config["seed"] * 7919 + epoch * 31 + rank):
            got += 1
            if to_skip > 0:
                to_skip -= 1
                continue
            yield to_training(columns)
        if got == 0:
            raise ValueError(f"{data['path']}: fewer clips than one batch of {batch} per worker x {world} workers")
        epoch += 1


def to_training(columns: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ray Data columns -> frames B x N x 3 x H x W float [0, 1], masks B x N x H x W long, valid B x O bool."""
    frames = columns["frames"].permute(0, 1, 4, 2, 3).float().div_(255.0)
    masks = columns["masks"].long()
    counts = columns["n_objects"].long()
    objects = max(1, int(counts.max())) if len(counts) else 1
    valid = torch.arange(1, objects + 1)[None, :] <= counts[:, None]
    return frames, masks, valid


def allreduce_gradients(network: nn.Module, world: int) -> None:
    """Average gradients over ranks by hand (one flat all-reduce): for updates made outside DDP's
    forward, whose own gradient hooks only fire after a forward through the DDP wrapper."""
    params = [p for p in network.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def make_train_step(model: nn.Module, network: STMNetwork, optimizer, scaler, autocast, tp: dict, strmn: dict,
                    world: int):
    """-> step(frames, masks, valid) -> UnrollOutput: forward, backward and optimizer update(s).

    STM, and STRMN with strmn.update = clip: one update per clip batch through the DDP wrapper
    (STRMN's TBPTT segments are cut, their losses summed). STRMN with update = segment: an update
    after every TBPTT segment (the paper's fine-tuning), gradients averaged by hand.
    """
    per_segment = network.config.kind == "strmn" and strmn.get("update", "clip") == "segment"

    def update(loss: torch.Tensor) -> None:
        with torch.autocast(loss.device.type, enabled=False):  # backward outside autocast
            scaler.scale(loss).backward()
            if per_segment and world > 1 and dist.is_initialized():
                allreduce_gradients(network, world)
            if tp["grad_clip"] > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(network.parameters(), tp["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

    def step(frames: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor) -> UnrollOutput:
        if per_segment:
            from stm_core.training import unroll_strmn

            with autocast:
                return unroll_strmn(network, frames, masks, valid, rule=strmn["rule"], slots=strmn["slots"],
                                    segment_length=strmn["segment_length"], loss=tp["loss"],
                                    top_p=tp["bootstrap_top_p"], optimizer_step=update)
        with autocast:
            out = model(frames, masks, valid)
        update(out.loss)
        return out

    return step


def train_loop(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tp = config["train"]
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"])  # same init on every rank (DDP broadcasts rank 0's anyway)
    random.seed(config["seed"] * 1000 + rank)
    rng = np.random.default_rng([config["seed"], rank])

    network = build_network(config)
    amp_dtype, use_scaler = precision(config, device)
    # channels_last on CPU too: one embedded STM step takes 0.82x the time (oneDNN's NHWC kernels).
    network = network.to(device, memory_format=torch.channels_last)
    unroll = Unroll(network, tp, config["strmn"])
    model = ray.train.torch.prepare_model(
        unroll, parallel_strategy_kwargs={"find_unused_parameters": network.config.kind == "strmn"})
    optimizer = torch.optim.Adam(network.parameters(), lr=tp["lr"], weight_decay=tp["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    start, totals = 0, {"clips": 0, "seconds": 0.0, "loss": float("nan"), "restarts": 0, "resumed_from": 0, "curve": []}
    # In-process runs (local mode) get no checkpoint from Ray Train: theirs are on this disk.
    checkpoint = ray.train.get_checkpoint() or latest_local_checkpoint(config.get("local_checkpoints"))
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, totals = state["step"], {"curve": [], **state["totals"], "restarts": state["totals"]["restarts"] + 1,
                                        "resumed_from": state["step"]}
        if len(state["rng"]) == world:
            set_rng_state(state["rng"][rank], rng)
        else:  # different worker count: fresh, still deterministic streams
            rng = np.random.default_rng([config["seed"], rank, start])
        if rank == 0:
            print(f"[train] resumed from the checkpoint at step {start} (restart {totals['restarts']})", flush=True)

    nodes = gather(node_id(), world)  # where each rank runs
    logger = None
    if rank == 0 and config["mlflow"]["run_id"]:
        from pipeline.tracking import RunLogger

        logger = RunLogger(config["mlflow"]["uri"], config["mlflow"]["run_id"])
        logger.tags({"ray_nodes": ",".join(sorted(set(nodes))), "ray_rank_nodes": ",".join(nodes)})
        if checkpoint is not None:
            logger.metrics({"resumed_from_step": start}, step=start)

    total = tp["steps"]
    skip = [max_skip_schedule(start, total, 0, tp["max_skip"], tp["skip_ramp"])]  # for the logs: the rows carry it
    batches = data_batches(config, rank, world, start)
    loss_sum = torch.zeros((), device=device)
    count, interval_start, waited = 0, time.perf_counter(), 0.0
    fault = config.get("fault") or {}
    fault_rank = faulty_rank(nodes, config.get("driver_node"))
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    train_step = make_train_step(model, network, optimizer, scaler, autocast, tp, config["strmn"], world)
    plateau, val_batches = plateau_setup(config, device, totals)  # (None, []) unless lr_schedule: plateau
    model.train()
    for step in range(start, total):
        if fault and step == fault["step"] and rank == fault_rank and not os.path.exists(fault["marker"]):
            inject_fault(fault["marker"], rank, step)
        skip[0] = max_skip_schedule(step, total, 0, tp["max_skip"], tp["skip_ramp"])
        t_wait = time.perf_counter()
        batch = next(batches)  # blocks only when the input pipeline is behind the step
        waited += time.perf_counter() - t_wait
        if device.type == "cuda":  # pinned host memory: the copies overlap the previous step's kernels
            batch = tuple(t.pin_memory() for t in batch)
        frames, masks, valid = (t.to(device, non_blocking=True) for t in batch)
        lr = lr_at(step, tp) * (plateau.scale if plateau is not None else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = train_step(frames, masks, valid)
        loss_sum += out.loss.detach()
        if plateau is not None and (step + 1) % tp["val_every"] == 0:
            error = check_plateau(plateau, unroll, val_batches, totals)
            if rank == 0:
                print(f"[train] step {step + 1} validation loss {error:.4f} lr x{plateau.scale:g}", flush=True)
        count += 1
        done = step + 1
        if done % tp["log_every"] and done % tp["checkpoint_every"] and done != total:
            continue
        # ---- report time: the only host syncs
        if world > 1:
            dist.all_reduce(loss_sum)
        loss = loss_sum.item() / (count * world)
        seconds = time.perf_counter() - interval_start
        clips = count * config["per_worker_batch"] * world
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
                if tp["log_images_every"] > 0 and (done % tp["log_images_every"] == 0 or done == total):
                    logger.image(sample_overlay(frames, masks, out.logits), f"overlays/step_{done:06d}.png")
        save = done % tp["checkpoint_every"] == 0 or done == total
        rngs = gather(rng_state(rng), world) if save else None
        if save and rank == 0:
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


def node_id() -> str:
    """This process's Ray node, or "local" for an in-process run without a Ray instance."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def faulty_rank(nodes: list[str], driver_node: str | None) -> int:
    """Fault tests kill the last rank that runs on another node than the driver (the last rank on
    one machine): on a cluster, the restart must then come from the stored checkpoint."""
    remote = [r for r, n in enumerate(nodes) if driver_node and n != driver_node]
    return remote[-1] if remote else len(nodes) - 1


def inject_fault(marker: str, rank: int, step: int) -> None:
    """Tests of fault tolerance: this worker process dies (once: the marker file remembers).

    It first waits until Ray Train has registered the reports already made: a crash within a
    moment of a report can otherwise lose that report's checkpoint (Ray processes reports
    asynchronously), and the run would resume from an earlier one.
    """
    import ray.train

    try:
        ray.train.get_all_reported_checkpoints(timeout_s=120)
    except Exception as err:  # noqa: BLE001 - alpha API; the crash must happen regardless
        print(f"[train] fault injection: could not wait for reported checkpoints: {err}", flush=True)
    Path(marker).write_text(f"{os.getpid()} {step} {node_id()}\n")
    print(f"[train] fault injection: worker rank {rank} (pid {os.getpid()}) exits at step {step}", flush=True)
    os._exit(1)


def report_checkpoint(metrics: dict, network, optimizer, scaler, step: int, rngs: list, totals: dict, config: dict,
                      world: int) -> None:
    """Rank 0: write the state to a fresh folder and report it. Ray copies it into the run's storage
    (then the local copy goes); in-process runs (num_workers 0) keep it in `local_checkpoints`."""
    import ray.train

    local = config.get("local_checkpoints")
    name = f"checkpoint_{step:06d}_r{totals['restarts']}"
    if local:
        folder = Path(local) / name
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = Path(tempfile.mkdtemp(prefix="stm-checkpoint-"))
    write_state(str(folder), network, optimizer, scaler, step, rngs, totals, config, world)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)), checkpoint_dir_name=name,
                     delete_local_checkpoint_after_upload=not local)
    if local:  # Ray Train keeps num_to_keep in its storage; here we do
        for old in complete_checkpoints(local)[: -max(1, config["train"]["num_to_keep"])]:
            shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(local: str) -> list[Path]:
    """In-process checkpoints whose state and summary were both written (the summary goes last), oldest first."""
    folders = Path(local).glob("checkpoint_*") if Path(local).is_dir() else []
    return sorted(p for p in folders if (p / STATE_FILE).is_file() and (p / METRICS_FILE).is_file())


def latest_local_checkpoint(local: str | None):
    """The newest complete in-process checkpoint (a crashed stage resumes from it), or None."""
    import ray.train

    done = complete_checkpoints(local) if local else []
    return ray.train.Checkpoint.from_directory(str(done[-1])) if done else None


def write_state(folder: str, network: STMNetwork, optimizer, scaler, step: int, rngs: list, totals: dict,
                config: dict, world: int) -> None:
    state = {"model": {k: v.detach().cpu() for k, v in network.state_dict().items()},
             "model_config": network.config.to_dict(), "kind": network.config.kind,
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step, "rng": rngs,
             "totals": totals}
    torch.save(state, Path(folder) / STATE_FILE)
    summary = {"stage": config["stage"], "model": network.config.kind, "steps": step, "final_loss": totals["loss"],
               "clips": totals["clips"], "train_seconds": round(totals["seconds"], 3),
               "clips_per_s": clips_per_second(totals["clips"], totals["seconds"]),
               "restarts": totals["restarts"], "resumed_from": totals["resumed_from"],
               "global_batch": config["per_worker_batch"] * world, "workers": world,
               "curve": totals.get("curve", [])}
    (Path(folder) / METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def sample_overlay(frames: torch.Tensor, masks: torch.Tensor, logits: torch.Tensor) -> np.ndarray:
    """Clip 0 of the batch, its last frame: [frame + GT | frame + prediction] (uint8 H x 2W x 3)."""
    from stm_core.data.io import DAVIS_PALETTE

    frame = (frames[0, -1].detach().float().clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
    pred = logits[0, -1].detach().argmax(0).cpu().numpy()
    return overlay(frame, masks[0, -1].cpu().numpy(), pred, DAVIS_PALETTE)
