"""Time training steps of one worker (no Ray, no MLflow: torch + stm_core only), e.g. the paper's
configuration on a GPU:

    python -m pipeline.train.bench --device cuda --backbone resnet50 --crop 384 --batch 4 --precision bf16

It builds the same `Unroll` module and optimizer step as `stm train` (channels_last, and autocast
on CUDA), runs `--warmup` untimed steps and `--steps` timed ones, and prints one JSON line: device
name, clips/s, ms/step, the share of time the step waited for data, peak memory, loss. The clips are
random tensors (the step alone: wait 0), or with `--data DIR` the synthetic Parquet shards of
`stm synthesize` read through the training input itself (Ray Data decode/crop in `map_batches`,
`iter_torch_batches` with prefetch), e.g.

    python -m pipeline.train.bench --device cpu --backbone resnet18 --crop 128 --batch 2 --data data/synthetic/stm
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch

from pipeline.train.data import DataSpec
from pipeline.train.loop import Unroll, build_network, precision
from pipeline.train.loop_config import InputPool, LoopConfig
from pipeline.train.settings import RayParams, StageParams, StrmnParams
from stm_core.model.network import ModelConfig


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--norm", default="frozen_bn", choices=("frozen_bn", "group"))
    p.add_argument("--decoder-dim", type=int, default=256)
    p.add_argument("--kind", default="stm", choices=("stm", "strmn"))
    p.add_argument("--crop", type=int, default=384)
    p.add_argument("--batch", type=int, default=4, help="clips per step on this device")
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--objects", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: torch's default)")
    p.add_argument("--data", default="", help="Parquet clip shards (local or URI) fed through the training input")
    p.add_argument("--prefetch", type=int, default=2, help="batches iter_torch_batches prefetches (with --data)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = bench_config(args)
    torch.manual_seed(0)
    net = build_network(config)
    channels_last = True  # as `stm train` (pipeline.train.loop), on CPU too
    net = net.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    model = Unroll(net, config.train, config.strmn)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.train.lr)
    dtype, use_scaler = precision(config.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    b, n, s, o = args.batch, args.frames, args.crop, args.objects
    random_batch = (torch.rand(b, n, 3, s, s, device=device), torch.randint(0, o + 1, (b, n, s, s), device=device),
                    torch.ones(b, o, dtype=torch.bool, device=device))
    batches = real_batches(config, args.warmup + args.steps) if args.data else None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    waited = [0.0]

    def step() -> torch.Tensor:
        if batches is None:
            frames, masks, valid = random_batch
        else:
            t = time.perf_counter()
            frames, masks, valid = (x.to(device, non_blocking=True) for x in next(batches))
            waited[0] += time.perf_counter() - t
        with autocast:
            out = model(frames, masks, valid)
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    waited[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    final_loss = float(loss)  # syncs
    seconds = time.perf_counter() - t0
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backbone": args.backbone, "crop": s, "batch": b, "frames": n, "objects": o, "kind": args.kind,
        "precision": str(dtype).replace("torch.", "") if dtype is not None else "fp32",
        "channels_last": channels_last, "steps": args.steps, "ms_per_step": round(1000 * seconds / args.steps, 1),
        "clips_per_s": round(b * args.steps / seconds, 2), "loss": round(final_loss, 4),
        "data": args.data or "random tensors", "data_wait_share": round(waited[0] / seconds, 3),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


def bench_config(args: argparse.Namespace) -> LoopConfig:
    """The loop's settings for the timed steps: the network and clips the flags ask for, the plain
    loss (no read loss), Adam at 1e-5, STRMN's unroll at rule C, 3 slots, 4-frame segments."""
    train = StageParams(steps=args.warmup + args.steps, batch_size=args.batch, lr=1e-5, loss="ce",
                        bootstrap_top_p=0.15, read_loss=0.0, frames=args.frames, crop=args.crop,
                        max_objects=args.objects, max_skip=0, data=args.data, data_format="parquet", init="none",
                        shuffle_buffer=0, precision=args.precision)
    model = ModelConfig(kind=args.kind, backbone=args.backbone, norm=args.norm, decoder_dim=args.decoder_dim)
    data = DataSpec(kind="parquet", path=args.data, format="parquet", split="train", shuffle_buffer=0,
                    short_videos="drop", cache_mb=0.0)
    return LoopConfig(stage="pretrain", model=model, init=None, train=train,
                      strmn=StrmnParams(rule="C", slots=3, segment_length=4), seed=0, frames=args.frames,
                      per_worker_batch=args.batch, data=data, threads=args.threads, pool=InputPool.of(RayParams()),
                      prefetch_batches=args.prefetch)


def real_batches(config: LoopConfig, steps: int):
    """Endless training batches from Parquet clip shards through the stage's own Ray Data input."""
    from pipeline.cluster import init_ray
    from pipeline.train.input import build_dataset
    from pipeline.train.loop import to_training

    init_ray()
    batch = config.per_worker_batch
    ds = build_dataset(config, steps, batch, materialize=False)
    while True:
        for columns in ds.iter_torch_batches(batch_size=batch, drop_last=True,
                                             prefetch_batches=config.prefetch_batches):
            yield to_training(columns)


if __name__ == "__main__":
    main()
