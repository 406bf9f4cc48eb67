"""Synthetic clip throughput: clips/s of `stm synthesize` with 1 actor and with every CPU.

    python benchmarks/synthesize_bench.py [--clips 400] [--frames 3] [--size 128] [--json out.json]

Makes the built-in image set in a temp folder (unless --images points to a static set), then
times (a) the pure synthesizer in this process (no Ray, no encoding) and (b) the whole Ray Data
pipeline (synthesis + JPEG/PNG encoding + Parquet writing) with 1 actor and with one per CPU.
Ray start-up is excluded; actor start-up and writing are included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.synthesize import SynthesizeParams, synthesize_set  # noqa: E402
from stm_core.data import BuiltinImagesConfig, StaticImageSet, clip_rng, synthesize_clip, write_builtin_images  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=400)
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--images", type=Path, help="a static image set (default: the built-in one, made here)")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()

    import ray

    from pipeline.cluster import init_ray

    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        images = args.images
        if images is None:
            images = Path(tmp) / "builtin-images"
            write_builtin_images(images, BuiltinImagesConfig(), seed=0)
        p = SynthesizeParams(height=args.size, width=args.size, clips_per_shard=max(1, args.clips // (2 * cpus)))
        pairs = StaticImageSet(images)
        cfg = p.synth_config(args.frames)
        n_local = min(args.clips, 100)
        start = time.perf_counter()
        for i in range(n_local):
            synthesize_clip(pairs, cfg, clip_rng(0, i))
        local = n_local / (time.perf_counter() - start)

        init_ray(num_cpus=cpus)
        rows = {"in-process synthesizer (1 core, no encoding)": local}
        try:
            for actors in sorted({1, cpus}):
                r = synthesize_set("bench", args.frames, args.clips, p, [images], Path(tmp) / f"out-{actors}",
                                   num_actors=actors)
                rows[f"Ray Data pipeline, {actors} actor(s)"] = r["clips_per_s"]
        finally:
            ray.shutdown()

    info = {"machine": f"{platform.machine()}, {cpus} CPUs, {platform.processor() or platform.platform()}",
            "load_average_1min": os.getloadavg()[0], "clips": args.clips, "frames": args.frames,
            "size": args.size, "clips_per_s": rows}
    print(f"\n{args.clips} clips of {args.frames} x {args.size}x{args.size} frames on {info['machine']} "
          f"(load average {info['load_average_1min']:.1f})")
    for name, value in rows.items():
        print(f"  {name:48s} {value:8.1f} clips/s")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
