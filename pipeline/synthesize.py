"""Synthesize pretraining clips from static image+mask sets on Ray Data -> data/synthetic/<set>/*.parquet.

Rows of clip indices -> `map_batches` with a clip-making actor class on an `ActorPoolStrategy` ->
`write_parquet` with stable shard names (`clips-00000-0.parquet`, ...) and overwrite mode. Clip i
depends only on (seed, set name, i), so the same params give byte-identical shards on any number
of workers. Each set is written to a temp folder and renamed into place when whole.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import storage, tracking
from pipeline.params import DEFAULT_PARAMS, in_project, load_params, section
from pipeline.tracking import workspace_root
from stm_core.data.augment import AffineRange, ColorJitter, check_range
from stm_core.data.io import DataError
from stm_core.data.synth import SynthConfig, default_clip_affine, default_frame_affine, default_object_affine

log = logging.getLogger("pipeline.synthesize")
VAL_DIR = "_val"  # a set's validation clips: <set>/_val/*.parquet (Parquet readers skip "_" folders)


@dataclass
class ClipSetParams:
    frames: int = 3  # frames per clip
    clips: int = 1000  # clips in the set
    sources: list[str] | None = None  # its static sets (null: synthesize.sources)
    val_clips: int = 0  # validation clips from held-out images (val_share), in <set>/_val (0: none, all images train)


def _default_sets() -> dict[str, ClipSetParams]:
    return {"stm": ClipSetParams(3, 240), "strmn": ClipSetParams(5, 120)}


@dataclass
class SynthesizeParams:
    """params.yaml section `synthesize`."""

    sources: list[str] = field(default_factory=lambda: ["builtin-images"])  # static sets under raw_root
    raw_root: str = "data/raw"  # where `stm download` put the sources
    output: str = "data/synthetic"  # one sub-folder of Parquet shards per clip set
    seed: int = 0  # clip i of set s depends only on (seed, s, i)
    sets: dict[str, ClipSetParams] = field(default_factory=_default_sets)  # name -> frames, clips
    height: int = 128  # clip frame height
    width: int = 128  # clip frame width
    max_objects: int = 3  # objects per clip (1..max), each from a different source image
    clip_affine: AffineRange = field(default_factory=default_clip_affine)  # per clip (background layer)
    frame_affine: AffineRange = field(default_factory=default_frame_affine)  # per frame (every layer)
    object_affine: AffineRange = field(default_factory=default_object_affine)  # per clip (pasted objects)
    object_scale: list[float] = field(default_factory=lambda: [0.3, 0.6])  # pasted object side / frame side
    clip_jitter: ColorJitter = field(default_factory=lambda: ColorJitter(0.2, 0.2, 0.2, 0.03))  # per clip
    frame_jitter: ColorJitter = field(default_factory=lambda: ColorJitter(0.05, 0.05, 0.05, 0.01))  # per frame
    min_area: float = 0.005  # share of frame 0 an object must cover to be kept
    image_format: Literal["jpeg", "png"] = "jpeg"  # frame encoding in the shards (masks: palette PNG)
    jpeg_quality: int = 90  # JPEG quality when image_format is jpeg
    clips_per_shard: int = 250  # rows per Parquet file
    num_actors: int | None = None  # clip-making actors at most (null: one per shard)
    min_actors: int = 1  # clip-making actors at least; Ray Data grows the pool to num_actors as CPUs free up
    mode: Literal["paste", "affine"] = "paste"  # paste: objects of several images layered | affine: one image (STM)
    val_share: float = 0.0  # share of images held out of sets with val_clips > 0, for their validation clips

    def __post_init__(self) -> None:
        check_range("object_scale", self.object_scale)

    def synth_config(self, n_frames: int, split: str = "all") -> SynthConfig:
        return SynthConfig(n_frames=n_frames, height=self.height, width=self.width, max_objects=self.max_objects,
                           clip_affine=self.clip_affine, frame_affine=self.frame_affine,
                           object_affine=self.object_affine, object_scale=list(self.object_scale),
                           clip_jitter=self.clip_jitter, frame_jitter=self.frame_jitter, min_area=self.min_area,
                           mode=self.mode, split=split, val_share=self.val_share)  # type: ignore[arg-type]


def set_stream(name: str) -> int:
    """A stable random stream per clip set, so `stm` and `strmn` clips differ."""
    return zlib.crc32(name.encode())


class ClipMaker:
    """Ray Data UDF (one per actor): a batch of clip ids -> a pyarrow table of encoded clips."""

    def __init__(self, roots: list[str], cfg: SynthConfig, seed: int, stream: int, image_format: str, quality: int,
                 cache_mb: float = 0.0):
        from pipeline.remote_data import StorePairs
        from pipeline.storage import local_or_cached
        from stm_core.data.images import StaticImageSet
        from stm_core.data.synth import split_pairs

        # URIs: read from the store image by image as clips need them (no copy of the set on the node)
        uris = [r for r in roots if storage.is_uri(r)]
        images = StorePairs(uris, cache_mb) if uris else StaticImageSet([local_or_cached(r) for r in roots])
        self.pairs = split_pairs(images, cfg.split, cfg.val_share)  # held-out images: validation clips only
        self.cfg, self.seed, self.stream = cfg, seed, stream
        self.image_format, self.quality = image_format, quality

    def __call__(self, batch: dict[str, Any]):
        import pyarrow as pa

        from stm_core.data.clips import encode_clip_row
        from stm_core.data.synth import clip_rng, synthesize_clip

        rows = []
        for clip_id in sorted(int(i) for i in batch["id"]):
            clip = synthesize_clip(self.pairs, self.cfg, clip_rng(self.seed, clip_id, self.stream))
            rows.append(encode_clip_row(clip_id, clip, self.image_format, self.quality))
        return pa.Table.from_pylist(rows, schema=clip_schema())


def clip_schema():
    import pyarrow as pa

    return pa.schema([
        ("clip_id", pa.int64()), ("n_frames", pa.int32()), ("n_objects", pa.int32()), ("height", pa.int32()),
        ("width", pa.int32()), ("frames", pa.list_(pa.binary())), ("masks", pa.list_(pa.binary())),
        ("sources", pa.list_(pa.int32())), ("image_format", pa.string()),
    ])


def _shard_names():
    from ray.data.datasource import FilenameProvider

    class ShardNames(FilenameProvider):
        """`clips-<task>` (Ray appends `-<i>.parquet`): no write uuid, so names are the same every run."""

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"clips-{task_index:05d}"

    return ShardNames()


def synthesize_set(name: str, n_frames: int, clips: int, p: SynthesizeParams, roots: list[Path | str], out_dir: Path,
                   num_actors: int | None = None, mirror: str | None = None, split: str = "all",
                   cache_mb: float = 0.0) -> dict:
    """Write one clip set to `out_dir` (replaced atomically). Ray must be initialised.

    `roots` may be URIs (actors on any node read them); with `mirror` (a URI) the Ray Data writers
    write the shards there, once: the local `out_dir` (DVC's output) is then only the manifest of
    those store objects (path, size, rows, SHA-256), which readers take."""
    import ray
    from ray.data import ActorPoolStrategy, SaveMode

    shards = max(1, math.ceil(clips / p.clips_per_shard))
    # From params, never from the resources alive now: the pool grows from min_actors as nodes join.
    actors = max(1, min(num_actors or p.num_actors or shards, shards))
    low = max(1, min(p.min_actors, actors))
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shard k holds clips of block k, written as task k
    cfg = p.synth_config(n_frames, split)
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    start = time.perf_counter()
    ds = ray.data.range(clips, override_num_blocks=shards)
    ds = ds.map_batches(
        ClipMaker, batch_size=None, batch_format="numpy", compute=ActorPoolStrategy(min_size=low, max_size=actors),
        num_cpus=1,
        fn_constructor_kwargs={"roots": [str(r) for r in roots], "cfg": cfg, "seed": p.seed,
                               "stream": set_stream(name), "image_format": p.image_format, "quality": p.jpeg_quality,
                               "cache_mb": cache_mb},
    )
    # Writes are I/O: no CPU reservation, so they never wait behind the clip actors (2-CPU machines).
    write = {"filename_provider": _shard_names(), "mode": SaveMode.OVERWRITE, "ray_remote_args": {"num_cpus": 0}}
    if mirror:
        storage.delete_dir(mirror)
        fs, path = storage.filesystem(mirror)
        ds.write_parquet(path, filesystem=fs, **write)
        tmp.mkdir(parents=True, exist_ok=True)
        objects = storage.object_checksums(mirror, [f for f in storage.list_files(mirror)
                                                    if f.endswith(".parquet") and "/" not in f])
    else:
        ds.write_parquet(str(tmp), **write)
    seconds = time.perf_counter() - start
    shard_names = sorted(o["path"] for o in objects) if mirror else sorted(f.name for f in tmp.glob("*.parquet"))
    manifest = {"set": name, "clips": clips, "frames": n_frames, "shards": shard_names,
                **({"store": mirror, "objects": objects} if mirror else {}),
                "seed": p.seed, "sources": [str(r).rstrip("/").rsplit("/", 1)[-1] for r in roots],
                "config": asdict(cfg)}
    # "_" prefix: Parquet readers (pyarrow, Ray Data) skip it when given the folder.
    (tmp / "_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if mirror:
        storage.write_bytes(storage.join(mirror, "_manifest.json"), (tmp / "_manifest.json").read_bytes())
        storage.write_bytes(storage.join(mirror, storage.MIRROR_MARK),  # the store holds what the manifest lists
                            json.dumps({"fingerprint": storage.fingerprint(tmp), "source": str(out_dir)}).encode())
    _replace_dir(tmp, out_dir)
    return {"set": name, "clips": clips, "seconds": seconds, "clips_per_s": clips / seconds, "actors": actors}


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished folder into place; an old one is removed only after the new one is there."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def set_sources(p: SynthesizeParams, where: str = "synthesize") -> dict[str, list[str]]:
    """Each clip set's static sets (its own `sources`, else synthesize.sources), checked."""
    out = {}
    for name, s in p.sets.items():
        out[name] = list(s.sources) if s.sources is not None else list(p.sources)
        if not out[name]:
            raise DataError(f"{where}.sets.{name}: no sources (set sources, or synthesize.sources)")
        if s.val_clips > 0 and not 0.0 < p.val_share < 1.0:
            raise DataError(f"{where}.sets.{name}: val_clips {s.val_clips} needs synthesize.val_share in (0, 1) "
                            f"(the share of images held out for them), got {p.val_share}")
    return out


def source_roots(p: SynthesizeParams, root: Path) -> list[Path]:
    names = list(dict.fromkeys([*p.sources, *(n for ns in set_sources(p).values() for n in ns)]))
    roots = [in_project(root, p.raw_root) / s for s in names]
    for r in roots:
        if not (r / "images").is_dir() or not (r / "masks").is_dir():
            raise DataError(f"{r}: not a static image set (images/ + masks/); run `stm download` with source "
                            f"{r.name!r} first, or fix synthesize.sources")
    return roots


def shared_locations(p: SynthesizeParams, root: Path, store: str) -> dict[str, str]:
    """Actors on any node read the sources and Ray Data writers on any node write the shards."""
    raw, out = in_project(root, p.raw_root), in_project(root, p.output)
    return {"synthesize.raw_root": storage.remote_mirror(store, root, raw) or str(raw),
            "synthesize.output": storage.remote_mirror(store, root, out) or str(out)}


def run_synthesize(params_file: str | Path, only: list[str] | None = None) -> list[dict]:
    params = load_params(params_file)
    p = section(params, "synthesize", SynthesizeParams)
    root = workspace_root(params_file)  # inputs and outputs: the temp copy under a queued experiment
    store = storage.storage_root(params)
    cache = section(params, "storage", storage.StorageParams).cache_mb  # workers' cache of store files
    roots = source_roots(p, root)
    out_root = in_project(root, p.output)

    import ray

    from pipeline.cluster import alive_nodes, init_ray, require_shared, resolve_tracking_uri

    started = not ray.is_initialized()
    ray_p = params.get("ray") or {}
    init_ray(num_cpus=ray_p.get("num_cpus"))
    results = []
    status, run_id, uri = "FAILED", None, ""
    try:
        nodes = alive_nodes()
        mirrors = {r: storage.remote_mirror(store, root, r) for r in roots}
        require_shared("synthesize", shared_locations(p, root, store), nodes)
        mlflow_p = section(params, "mlflow", tracking.MlflowParams)
        uri = resolve_tracking_uri(tracking.tracking_uri(tracking.project_root(params_file), mlflow_p.tracking_uri),
                                   nodes)
        run_id = tracking.create_run(uri, mlflow_p.experiment, "synthesize", {"synthesize": asdict(p)},
                                     tracking.standard_tags(root, "synthesize"))
        for r, mirror in mirrors.items():
            if mirror and storage.publish(r, mirror):
                print(f"synthesize: mirrored {r} to {mirror}", file=sys.stderr)
        by_name = {r.name: mirrors[r] or r for r in roots}
        for name, s in p.sets.items():
            if only and name not in only:
                continue
            out = out_root / name
            sources = [by_name[n] for n in set_sources(p)[name]]
            mirror = storage.remote_mirror(store, root, out)
            print(f"synthesize: {s.clips} clips x {s.frames} frames -> {out}" + (f" (via {mirror})" if mirror else ""),
                  file=sys.stderr)
            split = "train" if s.val_clips > 0 else "all"
            summary = synthesize_set(name, s.frames, s.clips, p, sources, out, mirror=mirror, split=split,
                                     cache_mb=cache)
            if s.val_clips > 0:  # after the set: replacing <set>/ would remove them. "_": readers skip it
                val = out / VAL_DIR
                synthesize_set(f"{name}/val", s.frames, s.val_clips, p, sources, val,
                               mirror=storage.remote_mirror(store, root, val), split="val", cache_mb=cache)
                print(f"synthesize: {name}: {s.val_clips} validation clips from held-out images -> {val}",
                      file=sys.stderr)
            print(f"synthesize: {name}: {summary['clips_per_s']:.1f} clips/s on {summary['actors']} actors",
                  file=sys.stderr)
            tracking.RunLogger(uri, run_id).metrics({f"{name}.clips": summary["clips"],
                                                     f"{name}.seconds": summary["seconds"],
                                                     f"{name}.clips_per_s": summary["clips_per_s"]}, step=0)
            results.append(summary)
        status = "FINISHED"
    except KeyboardInterrupt:  # SIGINT / SIGTERM (runguard.Stopped; Ray re-raises it plain): stopped, not failed
        status = "KILLED"
        raise
    finally:
        if run_id:
            tracking.finish_run(uri, run_id, status)
        if started:
            ray.shutdown()
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (section `synthesize`)")
    parser.add_argument("--set", action="append", dest="sets", help="only this clip set (repeatable)")


def run(args: argparse.Namespace) -> int:
    from pipeline.cluster import ClusterError
    from pipeline.runguard import run_stoppable

    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def body() -> int:
        try:
            run_synthesize(args.params, args.sets)
        except (ClusterError, storage.StorageError, DataError) as err:
            print(f"stm synthesize: error: {err}", file=sys.stderr)
            return 2
        return 0

    return run_stoppable("stm synthesize", body, lambda: partial_sets(args.params))


def partial_sets(params_file: str | Path) -> list[Path]:
    """The half-written clip sets of this process (`.<set>.tmp-<pid>` beside each set)."""
    out_root = in_project(workspace_root(params_file),
                          section(load_params(params_file), "synthesize", SynthesizeParams).output)
    return [p for p in out_root.glob(f"**/.*.tmp-{os.getpid()}") if p.is_dir()]
