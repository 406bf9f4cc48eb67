"""Training input on Ray Data: every stage's clips are a Dataset whose `map_batches` decode, crop and
augment on CPU workers; training ranks consume `get_dataset_shard("train").iter_torch_batches(...)`,
whose prefetch threads collate the uint8 columns (`ClipCollate`), pin them and copy them to the device.

- Synthetic clips (`stm synthesize` Parquet shards, local or at a URI, or the store objects a shard
  manifest names): JPEG/PNG rows -> decoded, cropped, flipped, relabelled clips, in plain tasks (the
  decoder holds no state).
- Real videos (DAVIS / YouTube-VOS layout, local or at a URI: frames are read from the store file
  by file, `pipeline.train.data.open_videos`): clip numbers -> stm_core's `VideoClipSampler` in an
  actor pool (each actor keeps its opened video index). Clip r belongs to step r // global_batch,
  whose curriculum skip it uses, and is drawn from clip_rng(seed, r): the data do not depend on the
  number of workers, and a run resumed at step k starts at clip k x global_batch (`DatasetFactory`).

Pools follow the cluster: `ray.data_min_actors` .. `ray.data_max_actors` actors (Ray Data's
autoscaler grows them as nodes join), at most as many tasks. Nothing is materialised unless asked
for, or (materialize: null) unless the stage's clips are small (`ray.materialize_max_mb`).

Each output row: frames N x H x W x 3 uint8, masks N x H x W uint8 (ids 1..K), n_objects, step.
"""

from __future__ import annotations

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline.train.data import VIDEO_STREAM, DataSpec, DecodeSynthetic, decode_synthetic, stack  # noqa: F401
from pipeline.train.loop_config import LoopConfig, holdout
from pipeline.train.shards import parquet_files, read_parquet  # noqa: F401

DECODE_BATCH = 16  # Parquet rows per decode call
COLUMNS = ("frames", "masks", "n_objects", "step")


def video_rows(total_steps: int, global_batch: int) -> int:
    """Clip numbers of a video stage: one step of slack, so every rank always fills its last batch."""
    return (total_steps + 1) * global_batch


class ClipCollate(NumpyBatchCollateFn):
    """iter_torch_batches collate (Ray Data's prefetch threads): the clip columns as uint8/int64
    tensors, as they are; Ray Data pins them and copies them to the device, where the loop converts."""

    # Ray types the base's return as an unbound TypeVar, which no concrete return matches
    def __call__(self, batch: dict[str, np.ndarray]) -> dict:  # type: ignore[override]
        import torch

        return {k: torch.from_numpy(np.ascontiguousarray(batch[k])) for k in COLUMNS}


class SampleVideoClips:
    """map_batches UDF (one per actor): clip numbers -> clips from stm_core's VideoClipSampler.
    The video index is built once per actor; a URI's frames are read from the store as needed.
    `offset`: the first clip number of the dataset (a resumed run's start)."""

    def __init__(self, data: DataSpec, n_frames: int, crop: int, max_objects: int, seed: int, total_steps: int,
                 global_batch: int, max_skip: int, skip_ramp: float, holdout: int = 0, offset: int = 0):
        from pipeline.train.data import open_videos, split_holdout
        from stm_core.data.sampler import VideoClipSampler, VideoSamplerConfig

        videos, _ = split_holdout(open_videos(data), holdout)  # held out: the plateau schedule's validation
        self.sampler = VideoClipSampler(videos, VideoSamplerConfig(
            n_frames=n_frames, height=crop, width=crop, max_objects=max_objects,
            short_videos=data.short_videos))  # strmn.short_videos (the driver's loop_config)
        self.seed, self.total, self.batch = seed, total_steps, global_batch
        self.max_skip, self.ramp, self.offset = max_skip, skip_ramp, offset

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from stm_core.data.sampler import max_skip_schedule
        from stm_core.data.synth import clip_rng

        clips, steps = [], []
        for r in (batch["id"] + self.offset).tolist():
            step = int(r) // self.batch
            skip = max_skip_schedule(step, self.total, 0, self.max_skip, self.ramp)
            clip = self.sampler.sample(clip_rng(self.seed, int(r), stream=VIDEO_STREAM), skip)
            clips.append((clip.frames, clip.masks))
            steps.append(step)
        return stack(clips, np.asarray(steps, np.int64))


def should_materialize(materialize: bool | None, rows: int, frames: int, crop: int, limit_mb: float) -> bool:
    """An explicit setting wins; null: only when the decoded clips fit in `limit_mb` (never at paper sizes)."""
    if materialize is not None:
        return bool(materialize)
    return rows * frames * crop * crop * 4 <= limit_mb * 2**20  # 3 colour bytes + 1 mask byte per pixel


def build_dataset(config: LoopConfig, total_steps: int, global_batch: int, materialize: bool | None,
                  cpus: float = 1.0, start: int = 0):
    """The stage's training Dataset, lazy (streamed) unless materialised (computed into the object
    store before training: the 2-CPU Ray Data + Train deadlock workaround for small inputs).
    Videos start at step `start` (clip start x global_batch)."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    ray.data.DataContext.get_current().enable_progress_bars = False  # log lines, not bars in DVC logs
    data, tp, pool = config.data, config.train, config.pool
    low, high = max(1, pool.min_actors), max(1, pool.max_actors)
    limit = pool.materialize_max_mb
    if data.kind == "parquet":
        source = read_parquet(data.path)
        # Counted before the decode: the Parquet metadata answer. count() after map_batches runs the
        # whole decode once and throws it away (measured: every row went through the decoder).
        rows = source.count()
        ds = source.map_batches(
            decode_synthetic, fn_kwargs={"crop": tp.crop, "max_objects": tp.max_objects, "seed": config.seed},
            batch_format="numpy", batch_size=DECODE_BATCH, compute=TaskPoolStrategy(size=high), num_cpus=cpus)
    else:
        offset = start * global_batch
        rows = video_rows(total_steps, global_batch) - offset
        ds = ray.data.range(rows, override_num_blocks=max(1, min(64, rows // max(1, global_batch)))).map_batches(
            SampleVideoClips, fn_constructor_kwargs={
                "data": data, "n_frames": config.frames, "crop": tp.crop, "max_objects": tp.max_objects,
                "seed": config.seed, "total_steps": total_steps, "global_batch": global_batch,
                "max_skip": tp.max_skip, "skip_ramp": tp.skip_ramp, "holdout": holdout(tp), "offset": offset},
            batch_format="numpy", batch_size=global_batch, compute=ActorPoolStrategy(min_size=low, max_size=max(low, high)),
            num_cpus=cpus)
    return ds.materialize() if should_materialize(materialize, rows, config.frames, tp.crop, limit) else ds


class DatasetFactory:
    """Ray Train calls it before each worker group starts (the first and every restart): the stage's
    Dataset from the step the run resumes at (`resume_step` of its checkpoints), so a resumed run
    makes no clip of the steps it already trained."""

    def __init__(self, config: LoopConfig, total_steps: int, global_batch: int, materialize: bool | None,
                 cpus: float = 1.0):
        self.config, self.total_steps, self.global_batch = config, total_steps, global_batch
        self.materialize, self.cpus = materialize, cpus

    def start_step(self) -> int:
        from pipeline.train.checkpoints import resume_step

        resume = self.config.resume
        start = resume_step(resume.storage_location, resume.run) \
            if resume is not None and self.config.data.kind == "videos" else 0
        if start:
            print(f"[train] input starts at step {start} (clip {start * self.global_batch})", flush=True)
        return start

    def dataset(self, start: int):
        return build_dataset(self.config, self.total_steps, self.global_batch, self.materialize, self.cpus,
                             start=start)

    def __call__(self):
        return self.dataset(self.start_step())

    def materialized_now(self):
        """The input computed into the object store now, in the driver, when it is to be materialised;
        else None (Ray Train calls the factory per worker group). Ray Train calls its factory once the
        worker group holds its CPUs, and on a machine whose training workers take every CPU Ray Data
        would then wait for ever. Records the step the input starts at in the loop's config (the
        object the trainer ships to its workers), so a worker group restarted later drops the
        batches of the steps it already trained."""
        from ray.data.dataset import MaterializedDataset

        start = self.start_step()
        ds = self.dataset(start)
        if not isinstance(ds, MaterializedDataset):
            return None
        self.config.input_first_step = start
        return ds
