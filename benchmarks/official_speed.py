"""CPU speed of our STM inference against the official STM implementation, side by side.

    python benchmarks/official_speed.py --official-src DIR [--objects 1 3] [--rounds 3] [--precision bf16] [--json OUT]

DIR holds the official code (`model.py`, `helpers.py`): get it from
https://github.com/seoungwugoh/STM (a clone, or `git archive HEAD | tar -x -C DIR`); it is not part of
this project. Both implementations get the same random ResNet-50 weights (the official network's
initialisation, imported into ours by `convert_state_dict`), the same synthetic frames and
first-frame mask, on CPU with the same thread count, `every:5` memory. The official side
is its `Run_video` loop in fp32; ours is `InferenceCore` with its defaults (the fused fast path)
at `--precision` (fp32, the default, or bf16). They run in one process, alternating (official
first in even rounds, ours first in odd ones) so both see the same machine load; ms/frame
excludes frames 0..`--skip` (the annotation, warm-up). Prints per round and the median ratio
official / ours (> 1: ours is faster) with `uptime`, and the mask agreement: the share of pixels
of frames 1.. whose argmax label is the official fp32 one (bf16 moves near-ties; with the
untrained weights most pixels are near-ties, so read it as a lower bound for trained weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from official_harness import OFFICIAL_URL, official_stm, run_video

from stm_core.bench import synthetic_mask
from stm_core.inference import InferenceCore, probabilities_to_mask
from stm_core.model.official import convert_state_dict
from stm_core.precision import PRECISIONS


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def time_official(model, frames: torch.Tensor, mask: torch.Tensor, objects: int, skip: int, clock
                  ) -> tuple[float, torch.Tensor]:
    """-> ms/frame over frames skip+1.. of the official Run_video loop, and its labels T-1 x H x W
    (argmax of frames 1..; channel k is object k)."""
    masks = torch.zeros(1, objects + 1, *frames.shape[1:])
    masks[0, :, 0] = torch.stack([(mask == k).float() for k in range(objects + 1)])
    seconds: list[float] = []
    probs = run_video(model, frames[None], masks, objects, mem_every=5, clock=clock,
                      on_frame=lambda t, s: seconds.append(s) if t > skip else None)
    return 1000 * sum(seconds) / len(seconds), probs[0, :, 1:].argmax(dim=0).to(torch.uint8)


def time_ours(network, frames: torch.Tensor, mask: torch.Tensor, skip: int, clock, precision: str = "fp32"
              ) -> tuple[float, torch.Tensor]:
    """-> ms/frame over frames skip+1.. of InferenceCore (every:5, defaults, `precision`), frames
    streamed one by one, and its labels T-1 x H x W (object ids of frames 1..)."""
    core = InferenceCore(network, "every:5", device="cpu", precision=precision)
    seconds: list[float] = []
    labels = []
    for t in range(frames.shape[1]):
        start = clock()
        # Step t waits for frame t-1's memory encoding (run beside its query encoding) and starts
        # frame t's: each timed step holds one memory encoding and one segmentation, as the
        # official loop's iteration does (it memorises t-1, then segments t).
        probs = core.step(frames[:, t], mask if t == 0 else None)
        if t > skip:
            seconds.append(clock() - start)
        if t > 0:  # outside the timed span
            labels.append(probabilities_to_mask(probs, core.object_ids))
    core.close()
    return 1000 * sum(seconds) / len(seconds), torch.stack(labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-src", type=Path, required=True,
                   help=f"directory with the official STM code (model.py, helpers.py) from {OFFICIAL_URL}")
    p.add_argument("--objects", type=int, nargs="+", default=[1, 3])
    p.add_argument("--frames", type=int, default=22)
    p.add_argument("--skip", type=int, default=5, help="frames 0..skip are not timed")
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--width", type=int, default=432)
    p.add_argument("--rounds", type=int, default=3, help="official/ours pairs per object count")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: the process's CPU time (less sensitive to other jobs "
                        "on a shared machine; with --threads 1 it is the work done)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="ours: fp32 (exact) or bf16 (autocast; fast where oneDNN has AMX-BF16); the official side is fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    official = official_stm(args.official_src)  # its own random initialisation
    ours = convert_state_dict(official.state_dict(), source="official STM (random init)")
    g = torch.Generator().manual_seed(args.seed)
    frames = torch.rand(3, args.frames, args.height, args.width, generator=g)  # 3 x T x H x W
    rows = []
    print(f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, {args.threads} threads; "
          f"{args.height}x{args.width}, {args.frames} frames, every:5, official fp32 / ours {args.precision}, "
          f"frames 0..{args.skip} not timed, {args.clock} clock")
    for objects in args.objects:
        mask = synthetic_mask(args.height, args.width, objects, g)
        for r in range(args.rounds):
            load_before = os.getloadavg()[0]
            order = ["official", "ours"] if r % 2 == 0 else ["ours", "official"]
            runs = {name: time_official(official, frames, mask, objects, args.skip, clock) if name == "official"
                    else time_ours(ours, frames, mask, args.skip, clock, args.precision) for name in order}
            ms = {name: run[0] for name, run in runs.items()}
            row = {"objects": objects, "round": r, "order": order, "official_ms": ms["official"],
                   "ours_ms": ms["ours"], "ratio": ms["official"] / ms["ours"],
                   "agreement": float((runs["ours"][1] == runs["official"][1]).double().mean()),
                   "load_1min": [load_before, os.getloadavg()[0]]}
            rows.append(row)
            print(f"objects {objects} round {r}: official {row['official_ms']:.0f} ms/frame, ours "
                  f"{row['ours_ms']:.0f} ms/frame, ratio {row['ratio']:.2f}, mask agreement "
                  f"{100 * row['agreement']:.3f}%  (load {load_before:.2f})", flush=True)
    summary = {}
    for objects in args.objects:
        mine = [r for r in rows if r["objects"] == objects]
        summary[objects] = {k: statistics.median(r[k] for r in mine)
                            for k in ("official_ms", "ours_ms", "ratio", "agreement")}
        print(f"objects {objects}: median official {summary[objects]['official_ms']:.0f} ms/frame, ours "
              f"{summary[objects]['ours_ms']:.0f} ms/frame, ratio official/ours {summary[objects]['ratio']:.2f}, "
              f"mask agreement {100 * summary[objects]['agreement']:.3f}%")
    print(f"\n| objects | official fp32 ms/frame | ours {args.precision} ms/frame | ratio official / ours | "
          "mask agreement | load (1 min) |\n|---:|---:|---:|---:|---:|---|")
    for objects in args.objects:
        loads = [x for r in rows if r["objects"] == objects for x in r["load_1min"]]
        m = summary[objects]
        print(f"| {objects} | {m['official_ms']:.0f} | {m['ours_ms']:.0f} | {m['ratio']:.2f} | "
              f"{100 * m['agreement']:.3f}% | {min(loads):.1f}-{max(loads):.1f} |")
    print(uptime())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")  # written whole, then renamed: never half a file
        tmp.write_text(json.dumps({
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"},
            "rounds": rows, "median": summary, "uptime": uptime(), "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus"}, indent=2) + "\n")
        tmp.replace(args.json)
    return 0

if __name__ == "__main__":
    sys.exit(main())
