"""The parts of benchmarks/gpu_checks.py, each a function of (device, plan) -> its figures. A part
raises on error and returns {"passed": False, ...} when a check misses its bar; torch + stm_core only."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

TOLERANCE = 1e-4  # CUDA fp32 against CPU fp32, and the official fixture, in probability
BF16_AGREEMENT = 0.99  # bf16 masks equal to fp32's on this share of the pixels fp32 is sure of
BF16_SURE = 0.05  # ... pixels whose fp32 top-two probabilities differ by at least this


def fixture(official: Path, device: str) -> dict:
    """The official fixture in fp32 on `device`: every probability within 1e-4 of `expected.npz`."""
    from stm_core.data.io import read_frame, read_index_mask
    from stm_core.inference import InferenceCore
    from stm_core.model.checkpoint import load_checkpoint
    from stm_core.model.official import import_official

    expected = np.load(official / "expected.npz")["probs"]  # T x (1+O) x H x W
    with tempfile.TemporaryDirectory() as tmp:  # what `stm import-official WEIGHTS --out CKPT` runs
        weights, checkpoint = Path(tmp) / "STM_weights.pth", Path(tmp) / "model.pt"
        subprocess.run([sys.executable, str(official / "make_weights.py"), str(weights)], check=True)
        import_official(weights, checkpoint)
        network = load_checkpoint(checkpoint)
    core = InferenceCore(network, "every:5", device=device, precision="fp32")
    mask = torch.from_numpy(read_index_mask(official / "input" / "00000-mask.png").astype(np.int64))
    errors = []
    for t in range(len(expected)):
        probs = core.step(read_frame(official / "input" / f"{t:05d}.png"), mask if t == 0 else None)
        errors.append(float(np.abs(probs.float().cpu().numpy() - expected[t]).max()))
    core.close()
    return {"device": device, "frames": len(errors), "max_abs_error": max(errors), "tolerance": TOLERANCE,
            "passed": max(errors) <= TOLERANCE}


def seeded_video(kind: str, size: tuple[int, int], frames: int, objects: int, backbone: str | None):
    """The recipe's `kind` network with seed-0 random weights, and seeded frames with a first mask."""
    from stm_core.bench import synthetic_mask
    from stm_core.model.network import STMNetwork
    from stm_core.recipe import recipe_model

    torch.manual_seed(0)
    network = STMNetwork(recipe_model(kind, backbone)).eval()
    g = torch.Generator().manual_seed(1)
    h, w = size
    base = torch.rand(3, h, w, generator=g)
    shifted = [torch.roll(base, shifts=(2 * t, 3 * t), dims=(1, 2)) for t in range(frames)]  # a moving scene
    video = [(0.8 * f + 0.2 * torch.rand(3, h, w, generator=g)).clamp(0, 1) for f in shifted]
    return network, video, synthetic_mask(h, w, objects, g)


def segment(network, video: list[torch.Tensor], mask: torch.Tensor, memory: str, device: str,
            precision: str) -> torch.Tensor:
    """T x (1+O) x H x W probabilities (fp32, on the CPU) of the whole video."""
    from stm_core.inference import InferenceCore

    core = InferenceCore(network, memory, device=device, precision=precision)
    out = [core.step(frame.to(device), mask.to(device) if t == 0 else None).float().cpu()
           for t, frame in enumerate(video)]
    core.close()
    return torch.stack(out)


def cuda_against_cpu(plan: dict) -> dict:
    """CUDA fp32 against CPU fp32 (the path CI holds to the official code), same weights and frames."""
    rows, worst = [], 0.0
    for kind, memory in (("stm", "every:5"), ("strmn", "recurrent:5:C")):
        network, video, mask = seeded_video(kind, plan["parity_size"], plan["parity_frames"], 2, None)
        cpu = segment(network, video, mask, memory, "cpu", "fp32")
        cuda = segment(network, video, mask, memory, "cuda", "fp32")
        error = float((cuda - cpu).abs().max())
        worst = max(worst, error)
        rows.append({"kind": kind, "memory": memory, "frames": len(video), "max_abs_error": error})
    return {"rows": rows, "size": list(plan["parity_size"]), "max_abs_error": worst, "tolerance": TOLERANCE,
            "passed": worst <= TOLERANCE}


def bf16_agreement(plan: dict) -> dict:
    """bf16 against fp32 on CUDA: the masks' agreement where fp32 is sure, and the probabilities' gap."""
    rows, passed = [], True
    for kind, memory in (("stm", "every:5"), ("strmn", "recurrent:5:C")):
        network, video, mask = seeded_video(kind, plan["parity_size"], plan["parity_frames"], 2, None)
        fp32 = segment(network, video, mask, memory, "cuda", "fp32")[1:]  # frame 0 is the annotation
        bf16 = segment(network, video, mask, memory, "cuda", "bf16")[1:]
        top2 = fp32.topk(2, dim=1).values
        sure = (top2[:, 0] - top2[:, 1]) >= BF16_SURE
        same = fp32.argmax(1) == bf16.argmax(1)
        agreement_sure = float(same[sure].float().mean()) if bool(sure.any()) else float("nan")
        ok = bool(sure.any()) and agreement_sure >= BF16_AGREEMENT
        passed = passed and ok
        rows.append({"kind": kind, "memory": memory, "mask_agreement": float(same.float().mean()),
                     "mask_agreement_where_sure": agreement_sure, "sure_share": float(sure.float().mean()),
                     "mean_abs_diff": float((fp32 - bf16).abs().mean()),
                     "max_abs_diff": float((fp32 - bf16).abs().max()), "passed": ok})
    return {"rows": rows, "bar": f"agreement >= {BF16_AGREEMENT} where fp32's top-two gap >= {BF16_SURE}",
            "passed": passed}


def inference(device: str, plan: dict) -> dict:
    """FPS and peak memory of the recipe's networks (`stm_core.bench`), every row of the plan."""
    from stm_core.bench import bench_video, parse_args

    rows = []
    for memory, precision, objects in plan["inference_rows"]:
        h, w = plan["inference_size"]
        frames = plan["inference_frames"]
        args = parse_args(["--device", device, "--height", str(h), "--width", str(w), "--frames", str(frames),
                           "--objects", str(objects), "--precision", precision, "--memory", memory,
                           "--backbone", plan["backbone"], "--warmup", str(min(5, frames - 2))])
        with torch.inference_mode():
            r = bench_video(args)
        rows.append({"memory": memory, "precision": precision, "objects": objects, "height": h, "width": w,
                     "frames": frames, "backbone": plan["backbone"], "fps": r["fps"],
                     "peak_memory_mb": r["peak_memory_bytes"] / 2**20, "memory_entries": r["memory_entries"]})
        print(f"[gpu]   {rows[-1]}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows, "peak_memory": "CUDA max allocated" if device == "cuda" else "peak RSS growth"}


def read(device: str, plan: dict) -> dict:
    """The memory read against a bare 4-D SDPA on the same device (`stm_core.bench --mode read`)."""
    from stm_core.bench import bench_read, parse_args

    rows = []
    h, w = plan["read_size"]
    for precision in plan["read_precisions"]:
        args = parse_args(["--mode", "read", "--device", device, "--height", str(h), "--width", str(w),
                           "--frames", str(plan["read_frames"]), "--precision", precision,
                           "--repeats", str(plan["read_repeats"])])
        with torch.inference_mode():
            rows.append({"precision": precision, "height": h, "width": w, "memory_frames": plan["read_frames"],
                         **bench_read(args)})
    return {"rows": rows}


def training(device: str, plan: dict) -> dict:
    """Training steps/s (`stm_core.train_bench`): fp32 is IEEE fp32 (no TF32), labelled as it ran."""
    from stm_core.train_bench import bench_training, parser

    rows = []
    for kind, precision in plan["training_rows"]:
        argv = ["--device", device, "--kind", kind, "--precision", precision, *plan["training_args"]]
        rows.append(bench_training(parser().parse_args(argv)))
        print(f"[gpu]   training {kind} {precision}: {rows[-1]['ms_per_step']} ms/step", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows}
