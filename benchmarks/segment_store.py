"""`stm segment --videos s3://...` over many short videos in a store: videos/s and driver start-up.

    python benchmarks/segment_store.py [--videos 200 --frames 8 --size 64] [--workers 2] [--json OUT]

Writes `--videos` short mp4 files (a moving square, `--frames` frames of `--size`x`--size`) with
their first-frame masks, uploads them to a loopback S3 server (moto, started here and stopped at
the end), and runs the real `stm segment --videos s3://... --workers N` on a local Ray started
first (not timed), with a small untrained model (ResNet-18, decoder 16: the pipeline's overhead per
video is the figure, not the network's speed). Reports videos/s from the wall clock, the driver's
start-up (segment.json `startup_s`: listing the store, reading earlier records, until the first
video is handed to the pool) and `uptime`, as a markdown row and JSON (`--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def short_videos(root: Path, count: int, frames: int, size: int) -> None:
    from stm_core.data.io import write_index_mask
    from stm_core.data.video_file import write_video

    rng = np.random.default_rng(0)
    side = size // 3
    for i in range(count):
        bg = (rng.random((size, size, 3)) * 120 + 40).astype(np.uint8)

        def images(bg=bg):
            for t in range(frames):
                image = bg.copy()
                image[t:t + side, t:t + side] = (230, 40, 40)
                yield image

        write_video(root / f"clip-{i:04d}.mp4", images())
        mask = np.zeros((size, size), np.uint8)
        mask[:side, :side] = 1
        write_index_mask(root / f"clip-{i:04d}.png", mask)


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with log.open("wb") as sink:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=sink, stderr=sink, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return proc, url
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"moto_server did not answer at {url}; see {log}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=200)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import boto3
    import torch

    from pipeline import storage
    from pipeline.cli import main as stm
    from pipeline.cluster import init_ray, shutdown_ray
    from stm_core.model.checkpoint import save_checkpoint
    from stm_core.model.network import ModelConfig, STMNetwork

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        short_videos(work / "videos", args.videos, args.frames, args.size)
        torch.manual_seed(0)
        save_checkpoint(work / "model.pt", STMNetwork(ModelConfig(decoder_dim=16, norm="frozen_bn")))
        moto, url = start_moto(work / "moto.log")
        try:
            os.environ.update(CREDS, AWS_ENDPOINT_URL=url, STM_NODE_CACHE=str(work / "cache"))
            boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench",
                         aws_secret_access_key="bench").create_bucket(Bucket="bench")
            storage.upload_dir(work / "videos", "s3://bench/videos")
            before = uptime()
            init_ray(num_cpus=args.workers)  # started once, not timed; its workers inherit the store's address
            try:
                start = time.perf_counter()
                code = stm(["segment", "--checkpoint", str(work / "model.pt"), "--videos", "s3://bench/videos",
                            "--out", str(work / "out"), "--workers", str(args.workers), "--cpus-per-worker", "1",
                            "--memory", "every:5"])
                wall = time.perf_counter() - start
            finally:
                shutdown_ray()
            after = uptime()
            summary = json.loads((work / "out" / "segment.json").read_text())
        finally:
            os.killpg(moto.pid, signal.SIGTERM)
            moto.wait(timeout=30)
    counts = summary["summary"]
    if code != 0 or counts["done"] != args.videos:
        raise SystemExit(f"stm segment failed (exit {code}): {counts}")
    row = {"videos": args.videos, "frames": args.frames, "size": args.size, "workers": args.workers,
           "wall_s": round(wall, 2), "videos_per_s": round(args.videos / wall, 3), "startup_s": summary["startup_s"],
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
           "uptime_before": before, "uptime_after": after}
    print("\n| videos | workers | videos/s | driver start-up s | wall s |\n|---:|---:|---:|---:|---:|")
    print(f"| {args.videos} x {args.frames} frames {args.size}px | {args.workers} | {row['videos_per_s']:.2f} | "
          f"{row['startup_s']:.1f} | {row['wall_s']:.1f} |\n{before}\n{after}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
