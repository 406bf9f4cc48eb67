"""CPU speed of the onnx runtime (`stm export` graphs on onnxruntime) against PyTorch, same frames.

    python benchmarks/onnx_speed.py [--checkpoint CKPT] [--sizes 240x432 480x854] [--objects 1 3]
                                    [--frames 10] [--skip 2] [--threads 2] [--memory every:5] [--json OUT]

Without --checkpoint the network is the paper's STM (ResNet-50, decoder 256, frozen BatchNorm) with
random weights: speed does not depend on the weights. It is exported once (not timed). Per size and
object count, one run passes over the same frames with each runtime in turn, --rounds times,
alternating which goes first, so both see the same machine load: torch fp32 with its fast path
(BatchNorm folded, Winograd convolutions, the side lane), and onnxruntime's CPU provider fp32 with
the same thread count; the median pass counts. ms/frame excludes frames 0..--skip (the
annotation, warm-up). Also prints the largest probability difference and the mask agreement,
the CPU model (lscpu) and the load before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from stm_core.bench import synthetic_mask
from stm_core.inference import InferenceCore, probabilities_to_mask
from stm_core.model.checkpoint import save_checkpoint
from stm_core.model.official import OFFICIAL_CONFIG
from stm_core.onnx_export import export_checkpoint
from stm_core.onnx_runtime import OnnxNetwork
from stm_core.runtimes import load_network


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def run_one(network, memory: str, frames: torch.Tensor, mask: torch.Tensor, skip: int
            ) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
    """frames T x 3 x H x W -> ms/frame over frames skip+1.., probabilities and masks per frame.

    Time runs from frame skip+1's step to the end of the last frame's memory encoding: torch's side
    lane overlaps one frame's memory encoding with the next query encoding, as it does in use."""
    core = InferenceCore(network, memory, device="cpu")
    probs, ids = [], []
    start = 0.0
    for t in range(frames.shape[0]):
        if t == skip + 1:
            start = time.perf_counter()
        probs.append(core.step(frames[t], mask if t == 0 else None))
        ids.append(probabilities_to_mask(probs[-1], core.object_ids))
    core.synchronize()
    seconds = time.perf_counter() - start
    core.close()
    return 1000 * seconds / (frames.shape[0] - skip - 1), probs, ids


def run_pair(torch_net, onnx_net, memory: str, frames: torch.Tensor, mask: torch.Tensor, skip: int,
             rounds: int) -> dict:
    """Both runtimes over the same frames, alternating (torch first in even rounds) -> the median
    ms/frame of each, max |probability difference|, mask agreement."""
    ms: dict[str, list[float]] = {"torch": [], "onnx": []}
    out = {}
    for r in range(rounds):
        for name in (["torch", "onnx"] if r % 2 == 0 else ["onnx", "torch"]):
            t_ms, probs, ids = run_one(torch_net if name == "torch" else onnx_net, memory, frames, mask, skip)
            ms[name].append(t_ms)
            out[name] = (probs, ids)
    diff = max(float((a - b).abs().max()) for a, b in zip(out["torch"][0], out["onnx"][0]))
    agree = decided = 0
    for p, a, b in zip(out["torch"][0][1:], out["torch"][1][1:], out["onnx"][1][1:]):  # frames 1..
        top2 = p.topk(2, dim=0).values if p.shape[0] > 1 else None
        clear = (top2[0] - top2[1]) > 1e-3 if top2 is not None else torch.ones_like(a, dtype=torch.bool)
        agree += int((a == b)[clear].sum())
        decided += int(clear.sum())
    return {**{f"{n}_ms": statistics.median(v) for n, v in ms.items()}, "rounds": ms,
            "max_prob_diff": diff, "mask_agreement": agree / max(1, decided), "decided": decided}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the paper's STM, random weights")
    p.add_argument("--sizes", nargs="+", default=["240x432", "480x854"], help="HxW")
    p.add_argument("--objects", type=int, nargs="+", default=[1, 3])
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--skip", type=int, default=2, help="frames 0..skip are not timed")
    p.add_argument("--rounds", type=int, default=2, help="torch / onnxruntime passes each, alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", default="every:5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint
        if ckpt is None:
            from stm_core.model.network import STMNetwork

            ckpt = Path(tmp) / "model.pt"
            save_checkpoint(ckpt, STMNetwork(OFFICIAL_CONFIG))
        export_checkpoint(ckpt, Path(tmp) / "onnx")
        torch_net = load_network("torch", ckpt)
        onnx_net = OnnxNetwork(Path(tmp) / "onnx", ckpt, threads=args.threads)
        import onnxruntime

        print(f"{cpu_model()}, {os.cpu_count()} cpus; torch {torch.__version__}, onnxruntime "
              f"{onnxruntime.__version__}, {args.threads} threads; {args.memory}, {args.frames} frames, "
              f"frames 0..{args.skip} not timed; fp32; {'random paper STM' if args.checkpoint is None else ckpt}",
              flush=True)
        rows = []
        g = torch.Generator().manual_seed(args.seed)
        for size in args.sizes:
            h, w = (int(x) for x in size.split("x"))
            frames = torch.rand(args.frames, 3, h, w, generator=g)
            for objects in args.objects:
                load = os.getloadavg()[0]
                row = {"size": size, "objects": objects,
                       **run_pair(torch_net, onnx_net, args.memory, frames, synthetic_mask(h, w, objects, g), args.skip,
                                 args.rounds),
                       "load_1min": [load, os.getloadavg()[0]]}
                row["ratio"] = row["torch_ms"] / row["onnx_ms"]
                rows.append(row)
                print(f"{size}, {objects} object(s): torch {row['torch_ms']:.0f} ms/frame, onnxruntime "
                      f"{row['onnx_ms']:.0f} ms/frame, torch/onnx {row['ratio']:.2f}, max prob diff "
                      f"{row['max_prob_diff']:.1e}, masks {100 * row['mask_agreement']:.3f}% equal on "
                      f"{row['decided']} decided pixels "
                      f"(load {row['load_1min'][0]:.1f}-{row['load_1min'][1]:.1f})", flush=True)
    print("\n| size | objects | PyTorch ms/frame | onnxruntime ms/frame | PyTorch / onnxruntime | max prob diff "
          "| masks equal (decided px) | load (1 min) |\n|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['size']} | {r['objects']} | {r['torch_ms']:.0f} | {r['onnx_ms']:.0f} | {r['ratio']:.2f} | "
              f"{r['max_prob_diff']:.1e} | {100 * r['mask_agreement']:.2f}% | {r['load_1min'][0]:.1f}-{r['load_1min'][1]:.1f} |")
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "threads": args.threads, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
