"""Time training steps of one worker (no Ray, no MLflow: torch + stm_core only), e.g. the paper's
configuration on a GPU:

    python -m pipeline.train.bench --device cuda --backbone resnet50 --crop 384 --batch 4 --precision bf16

It builds the same `Unroll` module and optimizer step as `stm train` (channels_last and autocast
on CUDA), runs `--warmup` untimed steps and `--steps` timed ones on random clips, and prints one
JSON line: device name, clips/s, ms/step, peak memory, loss.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch

from pipeline.train.loop import Unroll, precision
from stm_core.model.network import ModelConfig, STMNetwork


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
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = STMNetwork(ModelConfig(kind=args.kind, backbone=args.backbone, norm=args.norm, decoder_dim=args.decoder_dim))
    channels_last = device.type == "cuda"
    net = net.to(device, memory_format=torch.channels_last) if channels_last else net.to(device)
    model = Unroll(net, {"loss": "ce", "bootstrap_top_p": 0.15}, {"rule": "C", "slots": 3, "segment_length": 4})
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-5)
    dtype, use_scaler = precision({"train": {"precision": args.precision}}, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    b, n, s, o = args.batch, args.frames, args.crop, args.objects
    frames = torch.rand(b, n, 3, s, s, device=device)
    masks = torch.randint(0, o + 1, (b, n, s, s), device=device)
    valid = torch.ones(b, o, dtype=torch.bool, device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    def step() -> torch.Tensor:
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
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss = float(loss)  # syncs
    seconds = time.perf_counter() - t0
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backbone": args.backbone, "crop": s, "batch": b, "frames": n, "objects": o, "kind": args.kind,
        "precision": str(dtype).replace("torch.", "") if dtype is not None else "fp32",
        "channels_last": channels_last, "steps": args.steps, "ms_per_step": round(1000 * seconds / args.steps, 1),
        "clips_per_s": round(b * args.steps / seconds, 2), "loss": round(loss, 4),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
