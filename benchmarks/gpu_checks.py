"""The GPU checks in one run, with torch alone (no Ray, MLflow or DVC; nothing outside the
repository): what `benchmarks/gpu.sh` runs.

    python benchmarks/gpu_checks.py [--out OUT.json] [--official DIR] [--quick]

Parts (each in its own try: one that fails is a row saying why, and the rest still run):
  fixture     the official fixture (`DIR`, default ../shared/official-stm) in fp32 on CUDA (on the CPU
              without CUDA): every probability within 1e-4 of the official code's. Not part of the
              repository: where it is absent the row says so (a failure only when --official names it).
  parity      CUDA fp32 against CPU fp32 in this run, same seeded weights and frames, STM every:5 and
              STRMN recurrent:5:C (the recipe's networks, ResNet-50): within 1e-4.       [CUDA only]
  bf16        bf16 against fp32 on CUDA: masks agree on >= 99% of the pixels fp32 is sure of. [CUDA only]
  inference   FPS and peak memory of the recipe's STM (every:5) and STRMN (recurrent:5:C) at 480x854,
              100 frames, 1 and 5 objects, fp32 and bf16 (`stm_core.bench`).
  read        the memory read against a bare 4-D SDPA on the same device, 480p, 21 memory frames.
  training    steps/s of the recipe's STM (IEEE fp32 and bf16) and STRMN (fp32), ResNet-50, 384 crops,
              batch 4 (`stm_core.train_bench`).
Without CUDA, inference, read and training run a small CPU smoke (ResNet-18 or small sizes, said in
each row) and the CUDA-only parts say "no CUDA". --quick: fewer rows and frames (at most 3 minutes
on one H100; the whole plan at most 8).

Writes OUT.json (every figure) and OUT.md (the table) after every part, atomically, and prints the
table. Exit code: 0 every part ran and passed; 1 a part failed, missed its bar or did not run; 2 none
failed but the CUDA-only parts could not run for want of CUDA (a CPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import gpu_parts  # noqa: E402 - benchmarks/gpu_parts.py, beside this file

OFFICIAL = (REPO / ".." / "shared" / "official-stm").resolve()
MEMORIES, PRECISIONS = ("every:5", "recurrent:5:C"), ("fp32", "bf16")
PLANS = {  # seconds: when the run has used this much, the parts left are not started
    "full": {"seconds": 480, "parity_size": (240, 432), "parity_frames": 8, "backbone": "resnet50",
             "inference_size": (480, 854), "inference_frames": 100,
             "inference_rows": [(m, p, o) for m in MEMORIES for p in PRECISIONS for o in (1, 5)],
             "read_size": (480, 854), "read_frames": 21, "read_precisions": PRECISIONS, "read_repeats": 20,
             "training_rows": [("stm", "fp32"), ("stm", "bf16"), ("strmn", "fp32")],
             "training_args": ["--crop", "384", "--batch", "4", "--warmup", "3", "--steps", "20"]},
    "quick": {"seconds": 180, "parity_size": (120, 216), "parity_frames": 4, "backbone": "resnet50",
              "inference_size": (480, 854), "inference_frames": 30,
              "inference_rows": [(m, p, 1) for m in MEMORIES for p in PRECISIONS],
              "read_size": (480, 854), "read_frames": 21, "read_precisions": PRECISIONS, "read_repeats": 5,
              "training_rows": [("stm", "fp32"), ("strmn", "fp32")],
              "training_args": ["--crop", "384", "--batch", "4", "--warmup", "2", "--steps", "5"]},
    "cpu": {"seconds": 240, "backbone": "resnet18", "inference_size": (64, 64), "inference_frames": 3,
            "inference_rows": [(m, "fp32", 1) for m in MEMORIES],
            "read_size": (64, 112), "read_frames": 2, "read_precisions": ("fp32",), "read_repeats": 2,
            "training_rows": [("stm", "fp32")],
            "training_args": ["--backbone", "resnet18", "--decoder-dim", "16", "--crop", "32", "--batch", "1",
                              "--frames", "3", "--warmup", "1", "--steps", "1"]},
}
NO_CUDA = "no CUDA"


def run_part(name: str, fn, started: float, plan: dict) -> dict:
    if time.perf_counter() - started > plan["seconds"]:
        return {"name": name, "status": "not run", "why": f"the {plan['seconds']}-s plan ran out", "seconds": 0.0}
    t0 = time.perf_counter()
    print(f"[gpu] {name} ...", flush=True)
    try:
        result = fn()
        status = "failed" if result.get("passed") is False else "ok"
        row = {"name": name, "status": status, "result": result}
        if status == "failed":
            row["why"] = "missed its bar"
    except Exception as err:  # a failing part is a row saying why; the others still run
        traceback.print_exc()
        row = {"name": name, "status": "failed", "why": f"{type(err).__name__}: {err}"}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[gpu] {name}: {row['status']} in {row['seconds']} s", flush=True)
    return row


def skipped(name: str, status: str, why: str) -> dict:
    print(f"[gpu] {name}: {status} ({why})", flush=True)
    return {"name": name, "status": status, "why": why, "seconds": 0.0}


def run(official: Path, official_named: bool, quick: bool, out: Path | None) -> dict:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    plan = PLANS["cpu" if not cuda else "quick" if quick else "full"]
    result: dict = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
                    "torch": torch.__version__, "cuda": torch.version.cuda, "quick": quick,
                    "plan_seconds": plan["seconds"], "parts": []}
    parts: list[dict] = result["parts"]
    started = time.perf_counter()

    def add(row: dict) -> None:
        parts.append(row)
        result["seconds"] = round(time.perf_counter() - started, 1)
        write(result, out)

    if (official / "expected.npz").is_file():
        add(run_part("fixture", lambda: gpu_parts.fixture(official, device), started, plan))
    elif official_named:
        add(skipped("fixture", "failed", f"no official fixture (expected.npz) at {official}"))
    else:
        add(skipped("fixture", "absent", f"no official fixture at {official}: not in the repository "
                                         "(pass --official DIR to check it)"))
    for name, fn in (("parity", gpu_parts.cuda_against_cpu), ("bf16", gpu_parts.bf16_agreement)):
        add(run_part(name, lambda fn=fn: fn(plan), started, plan) if cuda else skipped(name, NO_CUDA, "CUDA only"))
    for name, fn in (("inference", gpu_parts.inference), ("read", gpu_parts.read), ("training", gpu_parts.training)):
        add(run_part(name, lambda fn=fn: fn(device, plan), started, plan))
    return result


def exit_code(result: dict) -> int:
    statuses = {p["status"] for p in result["parts"]}
    if statuses & {"failed", "not run"}:
        return 1
    return 2 if NO_CUDA in statuses else 0


def _number(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) and x == x else "-"


def table(result: dict) -> str:
    lines = [f"Device: {result['device']}, torch {result['torch']}, CUDA {result['cuda']}"
             f"{', --quick' if result['quick'] else ''}; {result.get('seconds', 0)} s of a "
             f"{result['plan_seconds']}-s plan", "", "| part | status | seconds | note |", "|---|---|---:|---|"]
    for p in result["parts"]:
        r = p.get("result", {})
        note = p.get("why", "")
        if p["name"] in ("fixture", "parity") and "max_abs_error" in r:
            note = f"max abs error {r['max_abs_error']:.2e} on {r.get('device', 'cuda vs cpu')} (bar {r['tolerance']:g})"
        elif p["name"] == "bf16" and "rows" in r:
            note = "; ".join(f"{x['memory']}: agreement {x['mask_agreement_where_sure']:.4f} where sure, "
                             f"{x['mask_agreement']:.4f} all" for x in r["rows"])
        lines.append(f"| {p['name']} | {p['status']} | {p['seconds']} | {note} |")
    for p in result["parts"]:
        rows = p.get("result", {}).get("rows", [])
        if p["name"] == "inference" and rows:
            lines += ["", f"Inference ({p['result']['peak_memory']}):", "",
                      "| memory | precision | objects | size | backbone | FPS | peak MB |", "|---|---|---:|---|---|---:|---:|"]
            lines += [f"| {r['memory']} | {r['precision']} | {r['objects']} | {r['height']}x{r['width']}, "
                      f"{r['frames']} frames | {r['backbone']} | {_number(r['fps'], '.1f')} | "
                      f"{_number(r['peak_memory_mb'], '.0f')} |" for r in rows]
        if p["name"] == "read" and rows:
            lines += ["", "Read against a bare 4-D SDPA, same device:", "",
                      "| precision | size | memory frames | kernel | read ms | SDPA ms |", "|---|---|---:|---|---:|---:|"]
            lines += [f"| {r['precision']} | {r['height']}x{r['width']} | {r['memory_frames']} | {r['kernel']} | "
                      f"{r['read_ms']:.2f} | {r['sdpa_ms']:.2f} |" for r in rows]
        if p["name"] == "training" and rows:
            lines += ["", "Training (random clips, Adam):", "",
                      "| model | backbone | precision | math | crop | batch | frames | steps/s | clips/s | peak MB |",
                      "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
            lines += [f"| {r['kind']} | {r['backbone']} | {r['precision']} | {r['fp32_math']} | {r['crop']} | "
                      f"{r['batch']} | {r['frames']} | {1000 / r['ms_per_step']:.2f} | {r['clips_per_s']} | "
                      f"{_number(r['peak_memory_mb'], '.0f')} |" for r in rows]
    return "\n".join(lines)


def write(result: dict, out: Path | None) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out, json.dumps(result, indent=2, default=float) + "\n"),
                       (out.with_suffix(".md"), table(result) + "\n")):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/gpu.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "gpu.json",
                   help="the JSON; the table goes beside it as .md (default: benchmarks/gpu.json)")
    p.add_argument("--official", type=Path, default=None,
                   help=f"the official fixture (make_weights.py, input/, expected.npz); default {OFFICIAL}")
    p.add_argument("--quick", action="store_true", help="the short plan (at most 3 minutes on one H100)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    official = (args.official or OFFICIAL).resolve()
    result = run(official, args.official is not None, args.quick, args.out)
    print(table(result))
    write(result, args.out)
    code = exit_code(result)
    print(f"[gpu] exit {code}: " + {0: "every part ran and passed", 1: "a part failed or did not run",
                                    2: "nothing failed; the CUDA-only parts need CUDA"}[code], flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
