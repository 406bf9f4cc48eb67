"""The driver of `stm segment --dataset/--videos`: find the videos, skip complete ones, run the rest
on a pool of SegmentWorker actors (pipeline.workpool), keep OUT/segment.json up to date."""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from pipeline import storage
from pipeline.cluster import ClusterError
from pipeline.segment import sources
from pipeline.segment.outputs import Output, write_summary
from pipeline.segment.worker import SegmentWorker, Settings
from pipeline.workpool import Item, PoolError, PoolSpec, run_pool
from stm_core.data.io import DataError
from stm_core.memory import validate_policy
from stm_core.model.checkpoint import CheckpointError

SUMMARY_EVERY_S = 5.0  # segment.json is rewritten at most this often while videos finish (and at the end)


class SegmentError(RuntimeError):
    pass


def find_jobs(args: argparse.Namespace) -> tuple[list[sources.VideoJob], dict[str, str]]:
    """-> (videos to run, {video: error} for those already unreadable on the driver)."""
    root = args.dataset or args.videos
    local = storage.local_or_cached(root)  # a URI: this node's cached copy
    if args.dataset:
        jobs = sources.dataset_jobs(root, local, args.format, args.split, args.year, args.resolution,
                                    args.sequences)
    else:
        jobs = sources.video_file_jobs(root, local, args.sequences)
    failed = {}
    for job in jobs:
        try:
            sources.measure(job, local)
        except DataError as err:
            failed[job.name] = str(err)
    return [j for j in jobs if j.name not in failed], failed


def read_checkpoint(path: str) -> bytes:
    if storage.is_uri(path):
        try:
            return storage.read_bytes(path)
        except FileNotFoundError as err:
            raise CheckpointError(f"{path}: checkpoint not found") from err
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return Path(path).read_bytes()


def resolve_device(args: argparse.Namespace) -> tuple[str, float]:
    """(device, GPUs per actor): cuda with one GPU per actor unless told otherwise; 'auto' looks at
    the cluster (the driver's node may have no GPU while its workers do)."""
    import ray

    device = args.device
    if device == "auto":
        device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1.0 if device.startswith("cuda") else 0.0)
    return device, gpus


def check_cluster(args: argparse.Namespace) -> None:
    """On a multi-node cluster every worker must reach the inputs and OUT: store URIs, not local paths."""
    from pipeline.cluster import is_multi_node

    if not is_multi_node():
        return
    local = [name for name, value in (("--dataset/--videos", args.dataset or args.videos), ("--out", args.out),
                                      ("--checkpoint", None)) if value and not storage.is_uri(value)]
    if local:
        raise ClusterError(f"{', '.join(local)}: local paths, but this Ray cluster has several nodes that share no "
                           "disk; give store URIs (s3://bucket/..., gs://..., file:///shared/...)")


def run(args: argparse.Namespace) -> int:
    if args.dataset and args.videos:
        print("stm segment: give --dataset or --videos, not both", file=sys.stderr)
        return 2
    if not args.checkpoint:
        print("stm segment: --checkpoint is required (a model.pt written by `stm train`)", file=sys.stderr)
        return 2
    precision = getattr(args, "precision", None) or "fp32"
    try:
        validate_policy(args.memory)
        data = read_checkpoint(args.checkpoint)
        jobs, failed = find_jobs(args)
        return segment_many(args, data, jobs, failed, precision)
    except (CheckpointError, DataError, ValueError, ClusterError, PoolError, SegmentError) as err:
        print(f"stm segment: error: {err}", file=sys.stderr)
        return 2


def segment_many(args: argparse.Namespace, checkpoint: bytes, jobs: list[sources.VideoJob],
                 failed: dict[str, str], precision: str) -> int:
    import ray
    from tqdm import tqdm

    from pipeline.cluster import init_ray

    started = not ray.is_initialized()
    init_ray(num_cpus=None)
    try:
        check_cluster(args)
        device, gpus = resolve_device(args)
        settings = Settings(checkpoint=args.checkpoint, checkpoint_sha256=hashlib.sha256(checkpoint).hexdigest(),
                            memory=args.memory, precision=precision, max_size=args.max_size, device=device,
                            timed_kernels=bool(args.timed_kernels), runtime=args.runtime, onnx=args.onnx)
        out = Output(str(args.out))
        out.clean_partial()
        records: dict[str, dict] = {}
        todo, redo = [], 0
        for job in jobs:
            old = None if args.force else out.record(job.name)
            if old is not None and old.get("settings") == settings.key():
                records[job.name] = {**old, "skipped": True}
                continue
            redo += old is not None
            todo.append(job)
        for name, error in failed.items():
            records[name] = failure(name, error)
            print(f"stm segment: {name} failed: {error}", file=sys.stderr)
        if len(todo) < len(jobs):
            print(f"stm segment: skipping {len(jobs) - len(todo)} complete video(s) in {args.out} "
                  "(--force redoes them)", file=sys.stderr)
        if redo:
            print(f"stm segment: redoing {redo} video(s) made with other settings", file=sys.stderr)
        local = storage.local_or_cached(args.dataset or args.videos)
        items = [Item(j.name, j.length * sources.object_count(j, local), j) for j in todo]
        summary = lambda: summarize(args, settings, jobs, failed, records)  # noqa: E731
        write_summary(out, summary())
        frames_total = sum(j.length for j in todo)
        spec = PoolSpec(num_cpus=args.cpus_per_worker, num_gpus=gpus, actors=args.workers, wait_s=args.wait,
                        progress=True)
        threads = max(1, round(args.cpus_per_worker))
        last = [time.monotonic()]
        with tqdm(total=len(todo), desc="videos", unit="video", file=sys.stderr, position=0) as videos_bar, \
                tqdm(total=frames_total, desc="frames", unit="frame", file=sys.stderr, position=1) as frames_bar:

            def done(outcome) -> None:
                if outcome.error:
                    records[outcome.key] = failure(outcome.key, outcome.error)
                    tqdm.write(f"stm segment: {outcome.key} failed: {outcome.error}", file=sys.stderr)
                else:
                    records[outcome.key] = outcome.value
                videos_bar.update()
                if time.monotonic() - last[0] >= SUMMARY_EVERY_S:
                    write_summary(out, summary())
                    last[0] = time.monotonic()

            if items:
                ckpt_ref = ray.put(checkpoint)  # one copy in the object store for every actor
                run_pool(SegmentWorker, (ckpt_ref, settings, str(args.out), threads, args.overlay,
                                         args.warn_memory_mb), items, spec, on_done=done,
                         on_progress=lambda key, units: frames_bar.update(units))
        final = summary()
        write_summary(out, final)
    finally:
        if started:
            ray.shutdown()
    counts = final["summary"]
    print(f"stm segment: {counts['done']} video(s) segmented, {counts['skipped']} skipped, {counts['failed']} "
          f"failed; {storage.join(str(args.out), 'segment.json') if out.remote else Path(args.out) / 'segment.json'}",
          file=sys.stderr)
    return 1 if counts["failed"] else 0


def failure(name: str, error: str) -> dict:
    return {"status": "failed", "error": error}


def summarize(args: argparse.Namespace, settings: Settings, jobs, failed: dict[str, str], records: dict) -> dict:
    order = [j.name for j in jobs] + [n for n in failed if n not in {j.name for j in jobs}]
    videos = {name: records.get(name, {"status": "pending"}) for name in order}
    done = [r for r in videos.values() if r.get("status") == "done"]
    return {"checkpoint": settings.checkpoint, "checkpoint_sha256": settings.checkpoint_sha256,
            "memory": settings.memory, "precision": settings.precision, "max_size": settings.max_size,
            "device": settings.device, "input": args.dataset or args.videos,
            "summary": {"videos": len(videos), "done": sum(1 for r in done if not r.get("skipped")),
                        "skipped": sum(1 for r in done if r.get("skipped")),
                        "failed": sum(1 for r in videos.values() if r.get("status") == "failed"),
                        "pending": sum(1 for r in videos.values() if r.get("status") == "pending"),
                        "frames": sum(r["frames"] for r in done),
                        "seconds": round(sum(r["seconds"] for r in done), 3)},
            "videos": videos}
