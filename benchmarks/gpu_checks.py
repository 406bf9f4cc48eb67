"""The GPU checks in one run (torch only: no Ray, MLflow or DVC), what `benchmarks/gpu.sh` runs.

    python benchmarks/gpu_checks.py [--official DIR] [--json OUT] [--quick]

1. The official fixture on CUDA in fp32: the official-layout weights rebuilt by
   `DIR/make_weights.py`, imported as `stm import-official` does, segment `DIR/input` with every:5;
   every probability within 1e-4 of the official implementation's (`DIR/expected.npz`).
2. Inference FPS and peak memory (`torch.cuda.max_memory_allocated`) at 480x854 on a 100-frame
   video, 1 and 5 objects, fp32 and bf16, memory every:5 (STM) and recurrent:5:C (STRMN), ResNet-50
   (`stm_core.bench`, random weights: speed does not depend on them).
3. The paper recipe's training steps/s: ResNet-50, 384 crops, batch 4, 3-frame clips, fp32, one GPU
   (`pipeline.train.bench`, the training step of `stm train`).

Without CUDA it runs what a CPU can in a minute (the fixture on CPU, a 64-pixel smoke of parts 2
and 3) and marks each GPU part `skipped` with the reason; `--quick` forces that on any machine.
Prints a markdown table naming the device; `--json` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OFFICIAL = (REPO / ".." / "shared" / "official-stm").resolve()
TOLERANCE = 1e-4
OBJECTS = (1, 5)
PRECISIONS = ("fp32", "bf16")
MEMORIES = ("every:5", "recurrent:5:C")


def check_fixture(official: Path, device: str) -> dict:
    """Part 1 -> {"max_abs_error", "passed", ...}, or {"skipped": reason}."""
    # benchmarks/precision_jf.py: the rebuilt weights imported as `stm import-official` does
    from precision_jf import fixture_network

    from stm_core.data.io import read_frame, read_index_mask
    from stm_core.inference import InferenceCore

    if not (official / "expected.npz").is_file():
        return {"skipped": f"no official fixture at {official} (pass --official DIR)"}
    expected = np.load(official / "expected.npz")["probs"]  # T x (1+O) x H x W
    network = fixture_network(official / "make_weights.py").to(device)
    core = InferenceCore(network, "every:5", device=device, precision="fp32")
    mask = torch.from_numpy(read_index_mask(official / "input" / "00000-mask.png").astype(np.int64))
    errors = []
    for t in range(len(expected)):
        probs = core.step(read_frame(official / "input" / f"{t:05d}.png"), mask if t == 0 else None)
        errors.append(float(np.abs(probs.float().cpu().numpy() - expected[t]).max()))
    core.close()
    worst = max(errors)
    return {"device": device, "frames": len(errors), "max_abs_error": worst, "tolerance": TOLERANCE,
            "passed": worst <= TOLERANCE}


def inference_speed(device: str, height: int, width: int, frames: int, objects: int, precision: str,
                    memory: str) -> dict:
    from stm_core.bench import bench_video, parse_args

    args = parse_args(["--device", device, "--height", str(height), "--width", str(width), "--frames", str(frames),
                       "--objects", str(objects), "--precision", precision, "--memory", memory,
                       "--warmup", str(min(5, frames - 2))])
    with torch.inference_mode():
        r = bench_video(args)
    return {"objects": objects, "precision": precision, "memory": memory, "height": height, "width": width,
            "frames": frames, "fps": r["fps"], "peak_memory_mb": r["peak_memory_bytes"] / 2**20,
            "memory_entries": r["memory_entries"]}


def training_speed(device: str, backbone: str, crop: int, batch: int, steps: int) -> dict:
    from pipeline.train.bench import main as train_bench

    return train_bench(["--device", device, "--backbone", backbone, "--crop", str(crop), "--batch", str(batch),
                        "--precision", "fp32", "--warmup", "2", "--steps", str(steps)])


def run(official: Path, quick: bool) -> dict:
    cuda = torch.cuda.is_available() and not quick
    device = "cuda" if cuda else "cpu"
    why = "--quick" if quick and torch.cuda.is_available() else "no CUDA device"
    result: dict = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
                    "torch": torch.__version__, "cuda": torch.version.cuda, "parts": {}}
    parts = result["parts"]
    t0 = time.perf_counter()
    parts["fixture"] = check_fixture(official, device)
    print(f"[gpu] fixture on {device}: {parts['fixture']}", flush=True)
    if cuda:
        rows = []
        for memory in MEMORIES:
            for precision in PRECISIONS:
                for objects in OBJECTS:
                    rows.append(inference_speed("cuda", 480, 854, 100, objects, precision, memory))
                    torch.cuda.empty_cache()
                    print(f"[gpu] {rows[-1]}", flush=True)
        parts["inference"] = {"rows": rows}
        parts["training"] = training_speed("cuda", "resnet50", 384, 4, 20)
    else:
        smoke = inference_speed("cpu", 64, 64, 3, 1, "fp32", "every:5")
        parts["inference"] = {"skipped": f"480p FPS and peak memory need a GPU ({why})", "cpu_smoke": smoke}
        parts["training"] = {"skipped": f"paper-recipe training steps/s need a GPU ({why})",
                             "cpu_smoke": training_speed("cpu", "resnet18", 64, 1, 1)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def table(result: dict) -> str:
    parts = result["parts"]
    lines = [f"Device: {result['device']}, torch {result['torch']}", ""]
    fx = parts["fixture"]
    lines.append(f"Official fixture: skipped ({fx['skipped']})" if "skipped" in fx else
                 f"Official fixture on {fx['device']}, fp32: max abs error {fx['max_abs_error']:.2e} "
                 f"({'pass' if fx['passed'] else 'FAIL'}, tolerance {fx['tolerance']:g})")
    inf = parts["inference"]
    if "skipped" in inf:
        lines.append(f"Inference 480p: skipped ({inf['skipped']})")
    else:
        lines += ["", "| memory | precision | objects | FPS | peak memory MB |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['memory']} | {r['precision']} | {r['objects']} | {r['fps']:.1f} | {r['peak_memory_mb']:.0f} |"
                  for r in inf["rows"]]
    tr = parts["training"]
    lines.append("")
    lines.append(f"Training: skipped ({tr['skipped']})" if "skipped" in tr else
                 f"Training (ResNet-50, 384 crops, batch 4, fp32): {1000 / tr['ms_per_step']:.2f} steps/s, "
                 f"{tr['clips_per_s']} clips/s, peak {tr['peak_memory_mb']} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, default=OFFICIAL, help="the official fixture (make_weights.py, input/, expected.npz)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="the CPU checks only, even where CUDA is present")
    args = p.parse_args(argv)
    result = run(args.official.resolve(), args.quick)
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2, default=float) + "\n")
        os.replace(tmp, args.json)
    fixture = result["parts"]["fixture"]
    return 1 if fixture.get("passed") is False else 0


if __name__ == "__main__":
    sys.exit(main())
