"""Training throughput of one device with torch and stm_core alone (no Ray, MLflow or DVC), e.g. the
paper recipe's STM pretraining step on a GPU:

    python -m stm_core.train_bench --device cuda --kind stm --crop 384 --batch 4 --precision fp32

The network is the recipe's (`stm_core.recipe`: STM with frozen BatchNorm; STRMN with GroupNorm,
the unscaled Fusion Cell and the key similarity), channels-last as `stm train` puts it, trained by
the unrolls of `stm_core.training` (STRMN: truncated BPTT, an Adam step per segment as the recipe's
`strmn.update: segment`) on random clips. It runs `--warmup` untimed steps and `--steps` timed ones
and returns (and prints as one JSON line) clips/s, ms/step, peak memory and the loss.

Precision, labelled as it runs: `fp32` is IEEE fp32 (`exact_fp32`: no TF32 in cuDNN or cuBLAS,
what `stm train` sets for fp32 stages); `tf32` allows TF32 on CUDA; `bf16` / `fp16` are autocast
(fp16 with a GradScaler); `auto` is bf16 on CUDA and fp32 on CPU. Peak memory is CUDA's maximum
allocated over the timed steps (weights, Adam state, activations); none on CPU.
`python -m pipeline.train.input_bench` adds `--data` (the training input through Ray Data) to this.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator

import torch

from stm_core.model.network import ModelConfig, STMNetwork
from stm_core.precision import exact_fp32
from stm_core.recipe import (
    RECIPE_STRMN_PRETRAIN_FRAMES,
    RECIPE_STRMN_SEGMENT,
    RECIPE_STRMN_SLOTS,
    recipe_model,
)
from stm_core.training import unroll_stm, unroll_strmn

PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # frames B x N x 3 x H x W, masks B x N x H x W, valid B x O


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--kind", default="stm", choices=("stm", "strmn"), help="the recipe's STM or STRMN network")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--norm", default=None, choices=("frozen_bn", "group"), help="default: the recipe's")
    p.add_argument("--decoder-dim", type=int, default=None, help="default: the recipe's (256)")
    p.add_argument("--crop", type=int, default=384)
    p.add_argument("--batch", type=int, default=4, help="clips per step on this device")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default: 3 for STM, 5 for STRMN)")
    p.add_argument("--objects", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU torch threads (0: torch's default)")


def model_config(args: argparse.Namespace) -> ModelConfig:
    config = recipe_model(args.kind, args.backbone)
    changes = {k: v for k, v in (("norm", args.norm), ("decoder_dim", args.decoder_dim)) if v is not None}
    return dataclasses.replace(config, **changes)


def clip_frames(args: argparse.Namespace) -> int:
    if args.frames is not None:
        return args.frames
    return RECIPE_STRMN_PRETRAIN_FRAMES if args.kind == "strmn" else 3


def resolve_precision(choice: str, device: torch.device) -> str:
    if choice not in PRECISIONS:
        raise ValueError(f"unknown precision {choice!r}; choose one of {PRECISIONS}")
    if choice == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return choice


@contextlib.contextmanager
def math_mode(precision: str) -> Iterator[None]:
    """fp32: IEEE fp32 inside; tf32: TF32 allowed inside; either way the settings are restored after."""
    with exact_fp32():  # saves every backend setting and restores it on leaving
        if precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        yield


def bench_training(args: argparse.Namespace, batches: Iterator[Batch] | None = None, data: str = "") -> dict:
    """Time `args.steps` training steps after `args.warmup`; `batches` (any device) replaces the random clips."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    config = model_config(args)
    torch.manual_seed(0)
    network = STMNetwork(config).to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4 if config.kind == "strmn" else 1e-5)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    b, n, s, o = args.batch, clip_frames(args), args.crop, args.objects
    g = torch.Generator().manual_seed(0)
    random_batch = (torch.rand(b, n, 3, s, s, generator=g).to(device),
                    torch.randint(0, o + 1, (b, n, s, s), generator=g).to(device),
                    torch.ones(b, o, dtype=torch.bool, device=device))
    waited = [0.0]

    def update(loss: torch.Tensor) -> None:
        with torch.autocast(device.type, enabled=False):  # backward outside autocast, as `stm train`
            scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def step() -> torch.Tensor:
        if batches is None:
            frames, masks, valid = random_batch
        else:
            t = time.perf_counter()
            frames, masks, valid = (x.to(device, non_blocking=True) for x in next(batches))
            waited[0] += time.perf_counter() - t
        with autocast:
            if config.kind == "strmn":  # an update per TBPTT segment (strmn.update: segment)
                out = unroll_strmn(network, frames, masks, valid, rule="C", slots=RECIPE_STRMN_SLOTS,
                                   segment_length=RECIPE_STRMN_SEGMENT, optimizer_step=update)
                return out.loss.detach()
            out = unroll_stm(network, frames, masks, valid)
        update(out.loss)
        return out.loss.detach()

    with math_mode(precision):
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        waited[0] = 0.0
        t0 = time.perf_counter()
        loss = torch.zeros(())
        for _ in range(args.steps):
            loss = step()
        final_loss = float(loss)  # syncs
        seconds = time.perf_counter() - t0
    cuda = device.type == "cuda"
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "kind": config.kind, "backbone": config.backbone, "model": config.to_dict(), "crop": s, "batch": b,
        "frames": n, "objects": o, "precision": precision,
        "fp32_math": {"fp32": "ieee", "tf32": "tf32"}.get(precision, "autocast"),
        "channels_last": True, "steps": args.steps, "ms_per_step": round(1000 * seconds / max(1, args.steps), 1),
        "clips_per_s": round(b * args.steps / seconds, 2), "loss": round(final_loss, 4),
        "data": data or "random tensors", "data_wait_share": round(waited[0] / seconds, 3),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None,
        "torch": torch.__version__,
    }
    return result


def parser(prog: str = "python -m stm_core.train_bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    result = bench_training(parser().parse_args(argv))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
