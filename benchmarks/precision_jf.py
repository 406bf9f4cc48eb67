"""J&F of bf16 inference next to fp32 on real DAVIS-layout videos, and how often their masks agree.

    python benchmarks/precision_jf.py --data ../shared/data/davis-sample [--checkpoint CKPT]
        [--videos car-shadow] [--max-size 432] [--json OUT]

Weights: `--checkpoint` (a trained model), or by default the official-layout weights that
`../shared/official-stm/make_weights.py` rebuilds, imported as `stm import-official` does
(ResNet-50, the paper's network; deterministic, not trained, so J&F measures how far bf16 moves
the official network's masks, not how good they are). Every video is segmented with `every:5`
from its first annotation in fp32 and in bf16 (`InferenceCore(precision=...)`), scored on its
annotated frames (first and last not scored; only videos annotated on every frame), and the two
mask sequences are compared pixel by pixel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stm_core.data.io import read_frame, read_index_mask
from stm_core.inference import segment_video
from stm_core.model.checkpoint import load_checkpoint
from stm_core.model.official import import_official
from stm_core.scoring.sequences import evaluate_sequence, summarize

REPO = Path(__file__).resolve().parents[1]
MAKE_WEIGHTS = (REPO / ".." / "shared" / "official-stm" / "make_weights.py").resolve()


def fixture_network(make_weights: Path):
    with tempfile.TemporaryDirectory() as tmp:
        weights, checkpoint = Path(tmp) / "STM_weights.pth", Path(tmp) / "model.pt"
        subprocess.run([sys.executable, str(make_weights), str(weights)], check=True)
        import_official(weights, checkpoint)  # what `stm import-official WEIGHTS --out CKPT` runs
        return load_checkpoint(checkpoint)


def segment(network, frames: list[Path], first: np.ndarray, precision: str, max_size: int | None):
    start = time.perf_counter()
    masks = [m.numpy() for m in segment_video(network, (read_frame(f) for f in frames),
                                              {0: torch.from_numpy(first.astype(np.int64))}, "every:5", "cpu",
                                              max_size, precision)]
    return masks, (time.perf_counter() - start) / len(frames)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="DAVIS-layout root (JPEGImages/480p, Annotations/480p)")
    p.add_argument("--videos", nargs="+", default=["car-shadow"])
    p.add_argument("--checkpoint", type=Path, default=None, help="trained weights (default: the official fixture's)")
    p.add_argument("--make-weights", type=Path, default=MAKE_WEIGHTS)
    p.add_argument("--max-size", type=int, default=None, help="longest side the network sees (None: 480p as is)")
    p.add_argument("--frames", type=int, default=0, help="first N frames of each video (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    network = load_checkpoint(args.checkpoint) if args.checkpoint else fixture_network(args.make_weights)
    weights = str(args.checkpoint) if args.checkpoint else "official-layout fixture (make_weights.py)"
    scores: dict[str, list] = {"fp32": [], "bf16": []}
    rows = []
    for video in args.videos:
        frames = sorted((args.data / "JPEGImages" / "480p" / video).glob("*.jpg"))
        frames = frames[: args.frames] if args.frames else frames
        gt = {int(a.stem): read_index_mask(a) for a in (args.data / "Annotations" / "480p" / video).glob("*.png")}
        gt = {t: m for t, m in gt.items() if t < len(frames)}
        out = {precision: segment(network, frames, gt[0], precision, args.max_size) for precision in scores}
        # J&F needs every frame annotated (DAVIS-2016/2017 style); a video annotated only where objects
        # enter (YouTube-VOS style) gives the mask agreement only.
        scored = sorted(gt) if len(gt) == len(frames) >= 3 else []
        row = {"video": video, "frames": len(frames), "scored_frames": max(0, len(scored) - 2)}
        for precision, (masks, seconds) in out.items():
            if scored:
                scores[precision].append(evaluate_sequence([gt[t] for t in scored], [masks[t] for t in scored],
                                                           name=video))
            row[f"{precision}_s_per_frame"] = seconds
        row["mask_agreement"] = float(np.mean([(a == b).mean() for a, b in zip(out["fp32"][0], out["bf16"][0])]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {precision: summarize(s) for precision, s in scores.items() if s}
    result = {"weights": weights, "memory": "every:5", "max_size": args.max_size, "videos": rows,
              "summary": summary, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
              "threads": args.threads, "torch": torch.__version__, "load_average": os.getloadavg()}
    for precision, s in summary.items():
        print(f"{precision}: J&F {s['J&F-Mean']:.4f} (J {s['J-Mean']:.4f}, F {s['F-Mean']:.4f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
