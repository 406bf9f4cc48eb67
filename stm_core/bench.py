"""Speed and memory benchmark: `python -m stm_core.bench --memory every:5 --frames 100 ...`.

Runs with torch alone (no Ray/MLflow): random weights, synthetic frames already on the device,
file IO excluded, warm-up frames excluded; CUDA events on GPU. Inference takes InferenceCore's
fast path (`STMNetwork.fused_for_inference`) unless `--no-fast`. Prints and optionally writes JSON:
fps (frames per second, all objects), ms_per_frame, peak_memory_bytes (CUDA max allocated, or the
process's peak RSS growth on CPU), memory_entries (frames or slots held at the end), the settings.

The network is the paper recipe's (`stm_core.recipe`): STM for every:/fifo: policies, STRMN
(GroupNorm, unscaled Fusion Cell, key similarity) for recurrent:*. Peak memory counts the network
that runs: the original is built on the CPU and freed once InferenceCore holds its fused copy.

`--mode read` times the space-time memory read alone against a bare 4-D
scaled_dot_product_attention on the same shapes and device (and the top-k read when --top-k is
given); `kernel` names the SDPA kernel that serves the read there (`READ_KERNELS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from stm_core.inference import InferenceCore, memory_bytes, memory_entries
from stm_core.model.network import STRIDE, ModelConfig, STMNetwork
from stm_core.model.read import READ_KERNELS, memory_read
from stm_core.precision import DTYPES, PRECISIONS
from stm_core.recipe import recipe_model


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Timer:
    """Wall time on CPU, CUDA events on GPU (no host sync inside the timed loop)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self.start_event.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:  # seconds
        if self.cuda:
            self.end_event.record()
            torch.cuda.synchronize()
            return self.start_event.elapsed_time(self.end_event) / 1000
        return time.perf_counter() - self.t0


def synthetic_mask(height: int, width: int, objects: int, generator: torch.Generator) -> torch.Tensor:
    """H x W ids with `objects` random rectangles (later ids drawn on top)."""
    mask = torch.zeros(height, width, dtype=torch.long)
    for k in range(1, objects + 1):
        h, w = max(2, height // 4), max(2, width // 4)
        y = int(torch.randint(0, height - h + 1, (1,), generator=generator))
        x = int(torch.randint(0, width - w + 1, (1,), generator=generator))
        mask[y : y + h, x : x + w] = k
    return mask


def bench_video(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    rss_start = _rss_bytes()
    g = torch.Generator().manual_seed(args.seed)
    config = bench_model(args)
    # Built on the CPU: InferenceCore moves its fused copy to the device, and the original is freed,
    # so the peak counts only the network that runs.
    network = STMNetwork(config).eval()
    if args.channels_last:
        network = network.to(memory_format=torch.channels_last)
    # A small pool of frames on the device: generating frames is not what we measure.
    pool = torch.rand(min(8, args.frames), 3, args.height, args.width, generator=g).to(device)
    mask = synthetic_mask(args.height, args.width, args.objects, g).to(device)
    core = InferenceCore(network, args.memory, device=device, precision=args.precision, fast=not args.no_fast)
    del network  # the core holds what it runs (the fused copy, or this network itself with --no-fast)
    timer = Timer(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup = min(args.warmup, args.frames - 1)
    core.step(pool[0], mask)
    for t in range(1, warmup + 1):
        core.step(pool[t % len(pool)])
    timer.start()
    timed = 0
    for t in range(warmup + 1, args.frames):
        core.step(pool[t % len(pool)])
        timed += 1
    core.synchronize()  # the last frame's memory encoding may still run on the side lane: it counts
    seconds = timer.stop() if timed else float("nan")
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss_bytes() - rss_start
    return {
        "fps": timed / seconds if timed else float("nan"),
        "ms_per_frame": 1000 * seconds / timed if timed else float("nan"),
        "peak_memory_bytes": int(peak),
        "memory_entries": memory_entries(core),
        "memory_tensor_bytes": memory_bytes(core),
        "timed_frames": timed,
    }


def bench_model(args: argparse.Namespace) -> ModelConfig:
    """The recipe's network for the memory policy (`stm_core.recipe`): STRMN for recurrent:*, else STM."""
    kind = "strmn" if args.memory.startswith("recurrent") else "stm"
    return dataclasses.replace(recipe_model(kind, args.backbone), top_k=args.top_k)


def bench_read(args: argparse.Namespace) -> dict:
    """The read alone vs bare 4-D SDPA (the read's own layout: objects x 1 head x tokens x channels,
    so the same kernel can serve both) on the same device, for `--frames` memory entries."""
    device = torch.device(args.device)
    config = ModelConfig(backbone=args.backbone)
    h, w = -(-args.height // STRIDE), -(-args.width // STRIDE)
    dtype = DTYPES[args.precision]
    n, lq, lm = args.objects, h * w, args.frames * h * w
    q = torch.randn(n, lq, config.key_dim, device=device, dtype=dtype)
    k = torch.randn(n, lm, config.key_dim, device=device, dtype=dtype)
    v = torch.randn(n, lm, config.value_dim, device=device, dtype=dtype)
    timer = Timer(device)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        timer.start()
        for _ in range(args.repeats):
            fn()
        return 1000 * timer.stop() / args.repeats

    q4, k4, v4 = q[:, None], k[:, None], v[:, None]  # N x 1 x L x C
    sdpa_ms = timed(lambda: F.scaled_dot_product_attention(q4, k4, v4, scale=config.key_dim ** -0.5))
    read_ms = timed(lambda: memory_read(q, k, v))
    out = {"sdpa_ms": sdpa_ms, "read_ms": read_ms, "read_over_sdpa": read_ms / sdpa_ms,
           "query_tokens": lq, "memory_tokens": lm, "kernel": READ_KERNELS.get(device.type, SDPBackend.MATH).name,
           "baseline": "4-D scaled_dot_product_attention on the same device"}
    if args.top_k:
        out["top_k_read_ms"] = timed(lambda: memory_read(q, k, v, top_k=args.top_k))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stm_core.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["video", "read"], default="video")
    p.add_argument("--memory", default="every:5", help="memory policy: every:5, fifo:8, recurrent:5:C, ...")
    p.add_argument("--frames", type=int, default=100, help="video length (read mode: memory entries)")
    p.add_argument("--objects", type=int, default=1)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=854)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32: exact, TF32 off | bf16: bf16 autocast (CUDA and CPU)")
    p.add_argument("--channels-last", action="store_true", help="channels-last weights (the fast path does this on GPU)")
    p.add_argument("--no-fast", action="store_true",
                   help="run the network as trained, without InferenceCore's fused fast path (BatchNorm folded, Winograd)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--warmup", type=int, default=5, help="frames (after the first) excluded from timing")
    p.add_argument("--repeats", type=int, default=20, help="read mode: timed repetitions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    args = p.parse_args(argv)
    if args.frames < 2:
        p.error("--frames must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    with torch.inference_mode():
        result = bench_video(args) if args.mode == "video" else bench_read(args)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
    result.update(settings=settings, device_name=_device_name(args.device), torch=torch.__version__)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.json)
    return 0


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
