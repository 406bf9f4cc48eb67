"""Training input on Ray Data: every stage's clips are a Dataset whose `map_batches` decode, crop and
augment on CPU workers; training ranks consume `get_dataset_shard("train").iter_torch_batches(...)`.

- Synthetic clips (`stm synthesize` Parquet shards, local or at a URI): JPEG/PNG rows -> decoded,
  cropped, flipped, relabelled clips.
- Real videos (DAVIS / YouTube-VOS layout, local or at a URI): `range(rows)` of clip numbers ->
  stm_core's `VideoClipSampler` (the one clip sampler: decode, crop, affine, jitter). Clip r belongs
  to step r // global_batch, whose curriculum skip it uses, and is drawn from clip_rng(seed, r): the
  data do not depend on the number of workers. After a restart each rank skips as many batches as
  the checkpoint holds steps (the same count on every rank; see `pipeline.train.loop.data_batches`).

Each output row: frames N x H x W x 3 uint8, masks N x H x W uint8 (ids 1..K), n_objects, step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

VIDEO_STREAM = 7_000_003  # clip_rng stream of video clips (synthetic sets use their own)
DECODE_BATCH = 16  # Parquet rows per DecodeSynthetic call


def video_rows(total_steps: int, global_batch: int) -> int:
    """Clip numbers of a video stage: one step of slack, so every rank always fills its last batch."""
    return (total_steps + 1) * global_batch


class DecodeSynthetic:
    """map_batches UDF: Parquet clip rows -> prepared clips (crop to `crop`, flip, relabel)."""

    def __init__(self, crop: int, max_objects: int, seed: int):
        self.crop, self.max_objects, self.seed = crop, max_objects, seed

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        from pipeline.train.data import prepare
        from stm_core.data.clips import decode_clip_arrays
        from stm_core.data.synth import clip_rng

        n = len(batch["clip_id"])
        clips = []
        for i in range(n):
            row = {k: batch[k][i] for k in ("clip_id", "n_frames", "frames", "masks")}
            rng = clip_rng(self.seed, int(row["clip_id"]), stream=VIDEO_STREAM + 1)
            clips.append(prepare(decode_clip_arrays(row), self.crop, self.max_objects, rng))
        return stack(clips, np.full(n, -1, np.int64))


class SampleVideoClips:
    """map_batches UDF (one per actor): clip numbers -> clips from stm_core's VideoClipSampler.
    The videos are opened once per actor; a URI is copied to the actor's node first."""

    def __init__(self, data: dict, n_frames: int, crop: int, max_objects: int, seed: int, total_steps: int,
                 global_batch: int, max_skip: int, skip_ramp: float, holdout: int = 0):
        from pipeline.train.data import open_videos
        from pipeline.train.schedule import split_holdout
        from stm_core.data.sampler import VideoClipSampler, VideoSamplerConfig

        videos, _ = split_holdout(open_videos(data), holdout)  # held out: the plateau schedule's validation
        self.sampler = VideoClipSampler(videos, VideoSamplerConfig(n_frames=n_frames, height=crop,
                                                                               width=crop, max_objects=max_objects))
        self.seed, self.total, self.batch = seed, total_steps, global_batch
        self.max_skip, self.ramp = max_skip, skip_ramp

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from stm_core.data.sampler import max_skip_schedule
        from stm_core.data.synth import clip_rng

        clips, steps = [], []
        for r in batch["id"].tolist():
            step = int(r) // self.batch
            skip = max_skip_schedule(step, self.total, 0, self.max_skip, self.ramp)
            clip = self.sampler.sample(clip_rng(self.seed, int(r), stream=VIDEO_STREAM), skip)
            clips.append((clip.frames, clip.masks))
            steps.append(step)
        return stack(clips, np.asarray(steps, np.int64))


def stack(clips: list, steps: np.ndarray) -> dict[str, np.ndarray]:
    return {"frames": np.stack([c[0] for c in clips]), "masks": np.stack([c[1] for c in clips]),
            "n_objects": np.asarray([int(c[1].max()) for c in clips], np.int64), "step": steps}


def read_parquet(location: str):
    import ray

    from pipeline import storage

    if storage.is_uri(location):
        fs, path = storage.filesystem(location)
        return ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"])
    return ray.data.read_parquet(location, file_extensions=["parquet"])


class LocalShard:
    """In-process training (`ray.num_workers: 0` on one machine): the clips of `build_dataset`, made
    by the same UDFs from the same clip numbers, in this process. No Ray instance and no Ray Data
    actors to start, which is about 10 s of each stage's start-up on 2 CPUs. It offers the one
    method the training loop calls on a Ray Data shard (`iter_torch_batches`), one epoch per call.

    Videos: clip r is drawn from clip_rng(seed, r) for its step, exactly as on Ray Data. Parquet:
    every row decoded once (as `materialize`), then each epoch in a permutation drawn from
    `local_shuffle_seed` (Ray Data's local shuffle buffer, taken to the whole set)."""

    def __init__(self, config: dict, total_steps: int, global_batch: int):
        self.config, self.total, self.batch = config, total_steps, global_batch
        self._clips: dict[str, np.ndarray] | None = None  # decoded Parquet rows
        self._sampler: SampleVideoClips | None = None

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool = True, local_shuffle_buffer_size=None,
                           local_shuffle_seed: int | None = None, **_ignored):
        import torch

        data, tp = self.config["data"], self.config["train"]
        if data["kind"] == "parquet":
            columns = self._parquet_clips()
            n = len(columns["step"])
            order = (np.random.default_rng(local_shuffle_seed).permutation(n) if local_shuffle_buffer_size
                     else np.arange(n))
            batches = (order[i:i + batch_size] for i in range(0, n, batch_size))
            make = lambda rows: {k: v[rows] for k, v in columns.items()}  # noqa: E731
        else:
            if self._sampler is None:
                from pipeline.train.schedule import holdout

                self._sampler = SampleVideoClips(
                    data, self.config["frames"], tp["crop"], tp["max_objects"], self.config["seed"], self.total,
                    self.batch, tp["max_skip"], tp["skip_ramp"], holdout(tp))
            rows = video_rows(self.total, self.batch)
            batches = (np.arange(i, min(i + batch_size, rows)) for i in range(0, rows, batch_size))
            make = lambda ids: self._sampler({"id": ids})  # noqa: E731
        for ids in batches:
            if drop_last and len(ids) < batch_size:
                return
            yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in make(ids).items()}

    def _parquet_clips(self) -> dict[str, np.ndarray]:
        if self._clips is None:
            import pyarrow.parquet as pq

            from pipeline import storage

            path, tp = self.config["data"]["path"], self.config["train"]
            if storage.is_uri(path):
                raise ValueError(f"{path}: in-process training reads local Parquet shards only (use Ray Data)")
            files = sorted(Path(path).glob("*.parquet"))
            if not files:
                raise FileNotFoundError(f"{path}: no Parquet shards (run `stm synthesize` first)")
            decode = DecodeSynthetic(tp["crop"], tp["max_objects"], self.config["seed"])
            parts = []
            for f in files:
                table = pq.read_table(f, columns=["clip_id", "n_frames", "frames", "masks"])
                for start in range(0, table.num_rows, DECODE_BATCH):
                    chunk = table.slice(start, DECODE_BATCH)
                    parts.append(decode({k: chunk.column(k).to_numpy(zero_copy_only=False) for k in chunk.column_names}))
            self._clips = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return self._clips


def build_dataset(config: dict, total_steps: int, global_batch: int, materialize: bool, cpus: float = 1.0):
    """The stage's training Dataset (lazy unless `materialize`: then computed into the object store
    before training, which the 2-CPU embedded default needs to avoid the Ray Data + Train deadlock)."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.train.schedule import holdout

    ray.data.DataContext.get_current().enable_progress_bars = False  # log lines, not bars in DVC logs
    data, tp = config["data"], config["train"]
    if data["kind"] == "parquet":
        ds = read_parquet(data["path"]).map_batches(
            DecodeSynthetic, fn_constructor_args=(tp["crop"], tp["max_objects"], config["seed"]),
            batch_format="numpy", batch_size=DECODE_BATCH, compute=ActorPoolStrategy(min_size=1, max_size=4), num_cpus=cpus)
    else:
        rows = video_rows(total_steps, global_batch)
        ds = ray.data.range(rows, override_num_blocks=max(1, min(64, rows // max(1, global_batch)))).map_batches(
            SampleVideoClips, fn_constructor_kwargs={
                "data": data, "n_frames": config["frames"], "crop": tp["crop"], "max_objects": tp["max_objects"],
                "seed": config["seed"], "total_steps": total_steps, "global_batch": global_batch,
                "max_skip": tp["max_skip"], "skip_ramp": tp["skip_ramp"], "holdout": holdout(tp)},
            batch_format="numpy", batch_size=global_batch, compute=ActorPoolStrategy(min_size=1, max_size=4),
            num_cpus=cpus)
    return ds.materialize() if materialize else ds
