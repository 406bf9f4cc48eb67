"""Time training steps of one worker, e.g. the paper's configuration on a GPU:

    python -m pipeline.train.input_bench --device cuda --backbone resnet50 --crop 384 --batch 4 --precision bf16

The steps, network and labels are `stm_core.train_bench`'s (torch + stm_core only; what
benchmarks/gpu.sh runs); this adds `--data DIR`: the synthetic Parquet shards of `stm synthesize`
read through the training input itself (Ray Data decode/crop in `map_batches`, `iter_torch_batches`
with prefetch), so the result's `data_wait_share` says how long the step waited for data, e.g.

    python -m pipeline.train.input_bench --device cpu --backbone resnet18 --crop 128 --batch 2 --data data/synthetic/stm
"""

from __future__ import annotations

import argparse
import json
from typing import Literal, cast

from pipeline.train.data import DataSpec
from pipeline.train.loop_config import InputPool, LoopConfig
from pipeline.train.settings import RayParams, StageParams, StrmnParams
from stm_core.train_bench import add_arguments, bench_training, clip_frames, model_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.train.input_bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--data", default="", help="Parquet clip shards (local or URI) fed through the training input")
    p.add_argument("--prefetch", type=int, default=2, help="batches iter_torch_batches prefetches (with --data)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    batches = real_batches(bench_config(args), args.warmup + args.steps) if args.data else None
    result = bench_training(args, batches, data=args.data)
    print(json.dumps(result))
    return result


def bench_config(args: argparse.Namespace) -> LoopConfig:
    """The loop's settings the training input reads: the clips the flags ask for, plain loss."""
    frames = clip_frames(args)
    precision = cast(Literal["auto", "fp32", "bf16", "fp16"],  # the input does not depend on it
                     "fp32" if args.precision == "tf32" else args.precision)
    train = StageParams(steps=args.warmup + args.steps, batch_size=args.batch, lr=1e-5, loss="ce",
                        bootstrap_top_p=0.15, read_loss=0.0, frames=frames, crop=args.crop,
                        max_objects=args.objects, max_skip=0, data=args.data, data_format="parquet", init="none",
                        shuffle_buffer=0, precision=precision)
    data = DataSpec(kind="parquet", path=args.data, format="parquet", split="train", shuffle_buffer=0,
                    short_videos="drop", cache_mb=0.0)
    return LoopConfig(stage="pretrain", model=model_config(args), init=None, train=train,
                      strmn=StrmnParams(rule="C", slots=3, segment_length=4), seed=0, frames=frames,
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
