"""Throughput of `stm segment` over many videos with 1 and 2 workers on the same set.

    python benchmarks/segment_throughput.py [--dataset ROOT] [--checkpoint CKPT] [--workers 1 2]
        [--videos 8 --frames 24 --size 240] [--backbone resnet50] [--json OUT]

The set: `--dataset` (a DAVIS-layout root such as ../shared/data/davis-sample) or, by default,
built-in DAVIS-layout videos (`stm_core.data.builtin_videos`). The model: `--checkpoint`, or an
untrained STM network at the paper's configuration (ResNet-50, decoder 256): speed does not depend
on the weights. One Ray instance is started first (not timed); each worker count then runs the real
`stm segment --dataset ... --workers N --cpus-per-worker 1` (one torch thread per actor, actor start
and checkpoint load included) into a fresh output folder. Reports videos/s and frames/s from the
wall clock of each run, the mean per-video frames/s from segment.json, and the ratio of the
largest worker count to 1 worker, as JSON (`--json`) and a markdown table, with `uptime`.
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def builtin_set(root: Path, videos: int, frames: int, size: int) -> Path:
    from stm_core.data.builtin_videos import BuiltinVideosConfig, write_builtin_videos

    cfg = BuiltinVideosConfig(height=size, width=size, frames=frames, train_sequences=0, val_sequences=videos)
    write_builtin_videos(root, cfg, seed=0)
    return root


def untrained_checkpoint(path: Path, backbone: str) -> Path:
    from stm_core.model.checkpoint import save_checkpoint
    from stm_core.model.network import ModelConfig, STMNetwork

    torch.manual_seed(0)
    save_checkpoint(path, STMNetwork(ModelConfig(backbone=backbone)))
    return path


def run_once(dataset: Path, checkpoint: Path, out: Path, workers: int, memory: str, split: str) -> dict:
    """One `stm segment` run (in this process, on the Ray instance already started) -> its figures."""
    from pipeline.cli import main

    start = time.perf_counter()
    code = main(["segment", "--checkpoint", str(checkpoint), "--dataset", str(dataset), "--split", split,
                 "--out", str(out), "--workers", str(workers), "--cpus-per-worker", "1", "--memory", memory])
    wall = time.perf_counter() - start
    summary = json.loads((out / "segment.json").read_text())
    if code != 0 or summary["summary"]["failed"]:
        raise SystemExit(f"stm segment with {workers} workers failed (exit {code}); see {out / 'segment.json'}")
    done = [r for r in summary["videos"].values() if r.get("status") == "done"]
    frames = sum(r["frames"] for r in done)
    return {"workers": workers, "videos": len(done), "frames": frames, "wall_s": round(wall, 2),
            "videos_per_s": len(done) / wall, "frames_per_s": frames / wall,
            "mean_video_fps": sum(r["fps"] for r in done) / len(done),
            "worker_pids": len({r["worker_pid"] for r in done}), "load_1min": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, default=None, help="DAVIS-layout root (default: built-in videos)")
    p.add_argument("--split", default="val", help="ImageSets split of --dataset (the built-in set: val)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: an untrained paper-size STM")
    p.add_argument("--backbone", default="resnet50", help="backbone of the untrained default model")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--videos", type=int, default=8, help="built-in set: videos")
    p.add_argument("--frames", type=int, default=24, help="built-in set: frames per video")
    p.add_argument("--size", type=int, default=240, help="built-in set: frame side")
    p.add_argument("--memory", default="every:5")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from pipeline.cluster import init_ray, shutdown_ray

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        dataset = args.dataset or builtin_set(work / "davis", args.videos, args.frames, args.size)
        checkpoint = args.checkpoint or untrained_checkpoint(work / "model.pt", args.backbone)
        before = uptime()
        init_ray(num_cpus=max(args.workers))  # started once, not timed
        try:
            rows = [run_once(dataset, checkpoint, work / f"out-{n}", n, args.memory, args.split)
                    for n in args.workers]
        finally:
            shutdown_ray()
        after = uptime()
    base = next((r for r in rows if r["workers"] == 1), rows[0])
    top = max(rows, key=lambda r: r["workers"])
    result = {"runs": rows, "ratio": top["frames_per_s"] / base["frames_per_s"],
              "ratio_workers": [base["workers"], top["workers"]],
              "set": str(args.dataset) if args.dataset else
              f"built-in: {args.videos} videos x {args.frames} frames, {args.size}x{args.size}",
              "model": str(args.checkpoint) if args.checkpoint else f"untrained STM, {args.backbone}",
              "memory": args.memory, "threads_per_worker": 1,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
              "torch": torch.__version__, "uptime_before": before, "uptime_after": after}
    print("\n| workers | videos/s | frames/s | wall s | mean per-video frames/s |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['videos_per_s']:.3f} | {r['frames_per_s']:.2f} | {r['wall_s']:.1f} | "
              f"{r['mean_video_fps']:.2f} |")
    print(f"\n{top['workers']} workers / 1: {result['ratio']:.2f}x frames/s\n{before}\n{after}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
