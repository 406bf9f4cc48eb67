"""Segment videos with a trained checkpoint: one folder of frames, a dataset, or a folder of video files.

One video (torch only, no Ray; stm_core.segment):
  stm segment --checkpoint CKPT --frames DIR --masks DIR --out OUT
Many videos on a pool of Ray actors (this machine, or the cluster at $RAY_ADDRESS):
  stm segment --checkpoint CKPT --dataset ROOT [--split val] [--sequences a b] --out OUT
  stm segment --checkpoint CKPT --videos DIR --out OUT [--overlay]
--dataset takes DAVIS or YouTube-VOS layouts; --videos takes video files (clip.mp4) each with its
first-frame index mask clip.png beside it, or a folder clip/ of masks named by frame number for
objects that enter later. OUT (a folder, or a store URI such as s3://bucket/run) receives
OUT/<video>/<frame>.png palette masks, OUT/segment.json (per video: frames, objects, seconds,
frames/s, memory entries, peak memory, or the error naming the file) and with --overlay
OUT/<video>.mp4. A re-run skips a complete video only when its checkpoint, settings and input files
are the same (--force redoes them). Exit code 1: some videos failed (named in segment.json and the
log); 130/143: stopped by SIGINT/SIGTERM (the videos it was running marked interrupted). --device
auto (default): GPU actors when the cluster has or can add GPUs. --max-size defaults to 1280 here
(0: the source's size). See docs/segment.md.
"""

from __future__ import annotations

import argparse

from stm_core import segment as single


def add_arguments(parser: argparse.ArgumentParser) -> None:
    single.add_arguments(parser, frames_required=False)
    # auto: the many-video form asks the cluster (its GPUs, or those its autoscaler can add); the
    # one-video form this machine's torch
    parser.set_defaults(device="auto")
    many = parser.add_argument_group("many videos (pipeline.segment, on Ray)")
    many.add_argument("--dataset", help="DAVIS or YouTube-VOS root (a folder or a store URI)")
    many.add_argument("--videos", help="folder (or store URI) of video files, each with <name>.png or <name>/ masks")
    many.add_argument("--format", default="auto", choices=("auto", "davis", "youtube-vos"),
                      help="--dataset layout (auto: DAVIS if JPEGImages/ exists)")
    many.add_argument("--split", default="val", help="DAVIS ImageSets split or YouTube-VOS split folder")
    many.add_argument("--year", default="2017", help="DAVIS ImageSets year")
    many.add_argument("--resolution", default="480p", help="DAVIS resolution folder")
    many.add_argument("--sequences", nargs="+", default=None, help="only these videos (names)")
    many.add_argument("--workers", type=int, default=None,
                      help="actors (default: one per GPU, or per --cpus-per-worker CPUs, of the cluster)")
    many.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per actor (torch threads)")
    many.add_argument("--gpus-per-worker", type=float, default=None,
                      help="GPUs per actor (default: 1 with --device cuda, 0 on cpu)")
    many.add_argument("--overlay", action="store_true", help="also write OUT/<video>.mp4, masks over frames")
    many.add_argument("--fps", type=float, default=None,
                      help="--dataset overlays' frame rate (default: the dataset's: DAVIS 24, YouTube-VOS 30 over "
                           "the step of its frame numbers, 6 for every 5th frame)")
    many.add_argument("--force", action="store_true", help="redo videos that are already complete in OUT")
    many.add_argument("--warn-memory-mb", type=float, default=2048.0,
                      help="warn (once per video) when the memory grows past this size (unbounded policies)")
    many.add_argument("--wait", type=float, default=300.0,
                      help="seconds to wait for the cluster to offer one worker's resources")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "dataset", None) or getattr(args, "videos", None):
        from pipeline.segment.stage import run as run_many

        return run_many(args)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return single.run(args)
