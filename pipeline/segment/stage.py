"""The driver of `stm segment --dataset/--videos`: list the videos (pipeline.segment.listing), skip
those complete with the same settings and inputs, run the rest on a pool of SegmentWorker actors
(pipeline.workpool), keep OUT/segment.json up to date (pipeline.segment.summary). SIGINT/SIGTERM
stop the pool, mark the videos it was running as interrupted and exit 130/143."""

from __future__ import annotations

import argparse
import hashlib
import signal
import sys
import time
from pathlib import Path

from tqdm import tqdm

from pipeline import storage
from pipeline.cluster import ClusterError
from pipeline.runguard import Stopped, check_stop, stop_on_signals
from pipeline.segment import listing, sources
from pipeline.segment.outputs import Output, why_redo
from pipeline.segment.summary import INTERRUPTED, RunSummary, failure
from pipeline.segment.tree import Tree
from pipeline.segment.worker import SegmentWorker, Settings
from pipeline.workpool import Item, PoolError, PoolSpec, run_pool
from stm_core.data.io import DataError
from stm_core.memory import validate_policy
from stm_core.model.checkpoint import CheckpointError

SUMMARY_EVERY_S = 5.0  # segment.json is rewritten at most this often while videos finish (and at the end)
MAX_SIZE = 1280  # --max-size default of the many-video form: the network sees at most 1280 px (4K is 3x cheaper
# per side; masks are still written at the source's size); --max-size 0: the source's own size
RECORD_READERS = 16  # threads reading the videos' earlier records (one small file each) on the driver
REASONS = {"inputs": "with changed input files", "overlay": "without the overlay asked for",
           "checkpoint_sha256": "made by another checkpoint", "--force": "(--force)"}


class SegmentError(RuntimeError):
    pass


def stopped(err: KeyboardInterrupt) -> Stopped:
    """The `Stopped` of a signal; Ray's waits re-raise the handler's `Stopped` as a plain KeyboardInterrupt."""
    if isinstance(err, Stopped):
        return err
    try:
        check_stop()
    except Stopped as stop:
        return stop
    return Stopped(signal.SIGINT)


def find_jobs(args: argparse.Namespace) -> tuple[list[sources.VideoJob], dict[str, str]]:
    """-> (videos to run, {video: its error}): a fault of one video fails that video only."""
    start = time.monotonic()
    tree = Tree.scan(args.dataset or args.videos)  # one listing; no file is read or copied
    if args.dataset:
        jobs, failed = listing.dataset_jobs(tree, args.format, args.split, args.year, args.resolution,
                                            args.sequences, getattr(args, "fps", None))
    else:
        jobs, failed = listing.video_file_jobs(tree, args.sequences)
    print(f"stm segment: {len(jobs) + len(failed)} video(s) listed in {tree.where('')} "
          f"({len(tree.files)} files, {time.monotonic() - start:.1f} s)", file=sys.stderr)
    for job in jobs:  # the scheduling cost: frames x objects, or a video file's size (its header is read by its worker)
        job.cost = job.length * sources.object_count(job) if job.frames else tree.files[job.video][0] / 1e4
    return jobs, failed


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
    """(device, GPUs per actor). `auto` (the default) looks at the cluster, not at the driver (a
    job submitted from a CPU head still gets GPU actors): cuda when the cluster has GPUs now or its
    autoscaler's node types can add some, else cpu. cuda takes one GPU per actor unless told otherwise."""
    import ray

    device = args.device
    if device == "auto":
        device = "cuda" if cluster_gpus(ray.cluster_resources()) > 0 else "cpu"
        print(f"stm segment: --device auto: {device} actors", file=sys.stderr)
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1.0 if device.startswith("cuda") else 0.0)
    return device, gpus


def cluster_gpus(total: dict[str, float]) -> float:
    """GPUs the cluster has, or else the most its autoscaler may add (0 without an autoscaler)."""
    if total.get("GPU", 0) > 0:
        return float(total["GPU"])
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - no autoscaler config (a local Ray, an older Ray)
        most = {}
    return float(most.get("GPU", 0) or 0)


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
    began = time.monotonic()
    try:
        with stop_on_signals("stm segment"):
            validate_policy(args.memory)
            data = read_checkpoint(args.checkpoint)
            jobs, failed = find_jobs(args)
            return segment_many(args, data, jobs, failed, precision, began)
    except KeyboardInterrupt as err:  # before the pool started; a stop during it is handled in work()
        stop = stopped(err)
        print(f"stm segment: {stop}", file=sys.stderr)
        return stop.exit_code
    except (CheckpointError, DataError, ValueError, ClusterError, PoolError, SegmentError) as err:
        print(f"stm segment: error: {err}", file=sys.stderr)
        return 2


def segment_many(args: argparse.Namespace, checkpoint: bytes, jobs: list[sources.VideoJob],
                 failed: dict[str, str], precision: str, began: float | None = None) -> int:
    """`began`: when the command started (monotonic): segment.json's `startup_s` is the time from it
    to the first video handed to the pool (listing, earlier records, Ray)."""
    import ray

    from pipeline.cluster import init_ray

    started = not ray.is_initialized()
    init_ray(num_cpus=None)
    try:
        check_cluster(args)
        device, gpus = resolve_device(args)
        settings = Settings(checkpoint=args.checkpoint, checkpoint_sha256=hashlib.sha256(checkpoint).hexdigest(),
                            memory=args.memory, precision=precision, device=device,
                            max_size=MAX_SIZE if args.max_size is None else (args.max_size or None),
                            timed_kernels=bool(args.timed_kernels), resolution=args.resolution if args.dataset else "",
                            overlay=bool(args.overlay), runtime=args.runtime, onnx=args.onnx)
        out = Output(str(args.out))
        out.clean_partial()
        head = {"checkpoint": settings.checkpoint, "checkpoint_sha256": settings.checkpoint_sha256,
                "memory": settings.memory, "precision": settings.precision, "max_size": settings.max_size,
                "device": settings.device, "input": args.dataset or args.videos}
        run = RunSummary(out, head, [j.name for j in jobs] + list(failed))
        todo = plan(args, out, settings, jobs, run)
        for name, error in failed.items():
            fail(out, run, name, error)
        code = work(args, out, settings, checkpoint, gpus, todo, run, time.monotonic() if began is None else began)
    finally:
        if started:
            ray.shutdown()
    counts = run.as_dict()["summary"]
    print(f"stm segment: {counts['done']} video(s) segmented, {counts['skipped']} skipped, {counts['failed']} "
          f"failed{f', {counts[INTERRUPTED]} interrupted' if counts[INTERRUPTED] else ''}; {out.path('segment.json')}",
          file=sys.stderr)
    if code:
        return code
    return 1 if counts["failed"] else 0


def plan(args: argparse.Namespace, out: Output, settings: Settings, jobs: list[sources.VideoJob],
         run: RunSummary) -> list[sources.VideoJob]:
    """The jobs to run; complete videos of the same settings and inputs are recorded as skipped."""
    from concurrent.futures import ThreadPoolExecutor

    todo: list[sources.VideoJob] = []
    why: dict[str, int] = {}
    with ThreadPoolExecutor(RECORD_READERS) as readers:  # a store answers many small reads at once
        olds = list(readers.map(out.record, [j.name for j in jobs]))
    for job, old in zip(jobs, olds):
        reason = "--force" if args.force and old is not None else why_redo(old, settings.key(), job.inputs)
        if reason is None:
            run.set(job.name, {**(old or {}), "skipped": True})
            continue
        if old is not None:
            why[reason] = why.get(reason, 0) + 1
        todo.append(job)
    if len(todo) < len(jobs):
        print(f"stm segment: skipping {len(jobs) - len(todo)} complete video(s) in {args.out} "
              "(--force redoes them)", file=sys.stderr)
    if why:
        print(f"stm segment: redoing {sum(why.values())} video(s) whose output differs: "
              + ", ".join(f"{n} {REASONS.get(k, k + ' changed')}" for k, n in sorted(why.items())), file=sys.stderr)
    return todo


def fail(out: Output, run: RunSummary, name: str, error: str) -> None:
    """A video's error: recorded and logged, and an older output of it removed (never kept beside an error)."""
    run.set(name, failure(error))
    out.discard(name)
    tqdm.write(f"stm segment: {name} failed: {error}", file=sys.stderr)


def work(args: argparse.Namespace, out: Output, settings: Settings, checkpoint: bytes, gpus: float,
         todo: list[sources.VideoJob], run: RunSummary, began: float) -> int:
    """Run `todo` on the pool, keeping segment.json current; -> 0, or 128 + signal when stopped."""
    import ray

    items = [Item(j.name, j.cost, j) for j in todo]
    run.head["startup_s"] = round(time.monotonic() - began, 2)
    print(f"stm segment: started in {run.head['startup_s']:.1f} s; {len(items)} video(s) to segment", file=sys.stderr)
    run.write()
    spec = PoolSpec(num_cpus=args.cpus_per_worker, num_gpus=gpus, actors=args.workers, wait_s=args.wait,
                    progress=True)
    threads = max(1, round(args.cpus_per_worker))
    last = [time.monotonic()]
    with tqdm(total=len(todo), desc="videos", unit="video", file=sys.stderr, position=0) as videos_bar, \
            tqdm(total=sum(j.length for j in todo) or None, desc="frames", unit="frame", file=sys.stderr,
                 position=1) as frames_bar:

        def done(outcome) -> None:
            if outcome.error:
                fail(out, run, outcome.key, outcome.error)
            else:
                run.set(outcome.key, outcome.value)
            videos_bar.update()
            if time.monotonic() - last[0] >= SUMMARY_EVERY_S:
                run.write()
                last[0] = time.monotonic()

        try:
            if items:
                ckpt_ref = ray.put(checkpoint)  # one copy in the object store for every actor
                run_pool(SegmentWorker, (ckpt_ref, settings, str(args.out), threads, args.overlay,
                                         args.warn_memory_mb), items, spec, on_done=done,
                         on_progress=lambda key, units: frames_bar.update(units))
        except KeyboardInterrupt as err:  # the pool's actors are gone (run_pool kills them on the way out)
            stop = stopped(err)
            by_name = {j.name: j for j in todo}

            def published(name: str) -> dict | None:  # finished on its actor as the stop came
                record = out.record(name) if name in by_name else None
                return record if record and why_redo(record, settings.key(), by_name[name].inputs) is None else None

            left = run.interrupt(f"{stop} before it completed", published)
            tqdm.write(f"stm segment: {stop}: {len(left)} video(s) interrupted, marked in segment.json",
                       file=sys.stderr)
            run.write()
            return stop.exit_code
    run.write()
    return 0
