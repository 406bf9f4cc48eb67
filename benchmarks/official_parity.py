"""Our STM vs the official STM implementation on real DAVIS frames, full size, several objects.

    python benchmarks/official_parity.py --official-src DIR [--data DIR] [--json OUT]

DIR holds the official code (`model.py`, `helpers.py`): get it from
https://github.com/seoungwugoh/STM (a clone, or `git archive HEAD | tar -x -C DIR`); it is not part of
this project. Weights in the official layout come from `--weights` or are rebuilt by
`make_weights.py` (deterministic, untrained); they reach our network through the
`stm import-official` code path (`import_official`: file in, project checkpoint out).

The video (default DAVIS `car-shadow`, 480x854, so padded to 480x864) runs through the official
`Run_video` loop (Mem_every=5) and through our `InferenceCore` (every:5, fp32, CPU), and through
`segment_video` (the masks `stm segment` writes). The first frame's annotation is split along the
longer side of its box into `--objects` objects. Per frame it reports the max abs probability
difference and the share of decided pixels (official top-two probabilities more than 1e-3 apart:
with untrained weights many pixels are near-ties) where our mask equals the official argmax.
Bar: max difference <= 1e-3 every frame, agreement >= 99.9%. Exit status 1 if missed.
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
from official_harness import OFFICIAL_URL, official_stm, one_hot, run_video
from PIL import Image

from stm_core.data.io import read_frame, read_index_mask
from stm_core.inference import InferenceCore, segment_video
from stm_core.model.checkpoint import load_checkpoint
from stm_core.model.official import import_official

MAX_DIFF = 1e-3
MIN_AGREEMENT = 0.999
TIE = 1e-3  # pixels whose official top-two probabilities are closer than this are not decided


def split_objects(mask: np.ndarray, objects: int) -> np.ndarray:
    """H x W annotation -> ids 1..objects: its foreground cut into equal bands along its box's longer side."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise SystemExit("the first-frame annotation is empty")
    horizontal = np.ptp(xs) >= np.ptp(ys)
    coord, lo, hi = (xs, xs.min(), xs.max() + 1) if horizontal else (ys, ys.min(), ys.max() + 1)
    band = np.minimum((coord - lo) * objects // (hi - lo), objects - 1) + 1
    out = np.zeros(mask.shape, dtype=np.uint8)
    out[ys, xs] = band
    return out


def official_layout_weights(args: argparse.Namespace, tmp: Path) -> Path:
    if args.weights is not None:
        return args.weights
    out = tmp / "STM_weights.pth"
    subprocess.run([sys.executable, str(args.make_weights), str(out)], check=True)
    return out


def compare(ours: np.ndarray, official: np.ndarray, mask: np.ndarray) -> dict:
    """ours/official: K x H x W probabilities; mask: H x W our ids -> the frame's figures."""
    top2 = np.sort(official, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > TIE
    agree = mask[decided] == official.argmax(axis=0)[decided]
    return {"max_abs_diff": float(np.abs(ours - official).max()), "decided_pixels": int(decided.sum()),
            "agreement": float(agree.mean()) if agree.size else 1.0,
            "argmax_agreement_all_pixels": float((ours.argmax(0) == official.argmax(0)).mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-src", type=Path, required=True,
                   help=f"directory with the official STM code (model.py, helpers.py) from {OFFICIAL_URL}")
    p.add_argument("--data", type=Path, required=True, help="DAVIS root with JPEGImages/480p and Annotations/480p")
    p.add_argument("--video", default="car-shadow")
    p.add_argument("--frames", type=int, default=14, help="frames to run (>= 12 exercises the every:5 memory)")
    p.add_argument("--objects", type=int, default=3)
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--weights", type=Path, default=None, help="official-layout weights (STM_weights.pth)")
    weights.add_argument("--make-weights", type=Path, default=None,
                         help="a script that writes deterministic official-layout weights to the path it is given")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    images = sorted((args.data / "JPEGImages" / "480p" / args.video).glob("*.jpg"))[: args.frames]
    if len(images) < args.frames:
        raise SystemExit(f"{args.video}: only {len(images)} frames under {args.data}")
    first = read_index_mask(args.data / "Annotations" / "480p" / args.video / "00000.png")
    mask0 = split_objects(first > 0, args.objects)

    with tempfile.TemporaryDirectory() as tmp:
        weights = official_layout_weights(args, Path(tmp))
        checkpoint = Path(tmp) / "model.pt"
        import_official(weights, checkpoint)  # what `stm import-official WEIGHTS --out CKPT` runs
        ours_net = load_checkpoint(checkpoint)
        official_net = official_stm(args.official_src, torch.load(weights, map_location="cpu", weights_only=True))

    # The official dataset's loading: np.array(RGB) / 255. as float32, one-hot masks.
    frames = torch.from_numpy(np.stack([np.array(Image.open(f).convert("RGB")) / 255.0 for f in images])
                              .astype(np.float32)).permute(3, 0, 1, 2)[None]  # 1 x 3 x T x H x W
    masks = torch.zeros(1, args.objects + 1, *frames.shape[2:])
    masks[0, :, 0] = one_hot(mask0, args.objects)
    t0 = time.perf_counter()
    official = run_video(official_net, frames, masks, args.objects, mem_every=5)[0].permute(1, 0, 2, 3).numpy()
    official_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    core = InferenceCore(ours_net, "every:5", device="cpu")
    given = torch.from_numpy(mask0.astype(np.int64))
    ours = [core.step(read_frame(f), given if t == 0 else None).numpy() for t, f in enumerate(images)]
    ours_s = time.perf_counter() - t0
    masks_ours = [m.numpy() for m in segment_video(ours_net, (read_frame(f) for f in images), {0: given},
                                                     memory="every:5", device="cpu")]

    per_frame = [dict(frame=t, **compare(ours[t], official[t], masks_ours[t])) for t in range(args.frames)]
    worst = max(f["max_abs_diff"] for f in per_frame)
    lowest = min(f["agreement"] for f in per_frame)
    passed = worst <= MAX_DIFF and lowest >= MIN_AGREEMENT
    for f in per_frame:
        print(f"frame {f['frame']:3d}  max |p - p_official| {f['max_abs_diff']:.2e}  "
              f"mask = official argmax on {100 * f['agreement']:.4f}% of {f['decided_pixels']:,} decided pixels")
    print(f"worst max abs difference {worst:.2e} (bar {MAX_DIFF:g}); lowest agreement {100 * lowest:.4f}% "
          f"(bar {100 * MIN_AGREEMENT:g}%): {'PASS' if passed else 'FAIL'}")
    result = {
        "video": args.video, "frames": args.frames, "objects": args.objects, "size": list(frames.shape[-2:]),
        "memory": "every:5", "dtype": "float32", "device": "cpu", "threads": args.threads,
        "weights": str(args.weights) if args.weights else f"{args.make_weights} (rebuilt)",
        "per_frame": per_frame, "worst_max_abs_diff": worst, "lowest_agreement": lowest, "passed": passed,
        "seconds": {"official": official_s, "ours": ours_s},
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
