"""`LocalShard`: the in-process input of `ray.num_workers: 0`, the clips Ray Data would make,
from the same functions and clip numbers, made in the training process between steps."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from pipeline.train.loop_config import LoopConfig, holdout
from pipeline.train.shards import ROW_GROUP_CACHE, parquet_files, store_objects  # noqa: F401

if TYPE_CHECKING:  # pipeline.train.input imports Ray: only when the videos need it
    from pipeline.train.input import SampleVideoClips


class LocalShard:
    """In-process training (`ray.num_workers: 0` on one machine): the clips of `build_dataset`, made
    by the same functions from the same clip numbers, in this process. No Ray instance and no Ray
    Data actors to start, which is about 10 s of each stage's start-up on 2 CPUs. It offers the one
    method the training loop calls on a Ray Data shard (`iter_torch_batches`), one epoch per call,
    and `seek(step)`: a resumed run's videos start at that step's clips.

    Videos: clip r is drawn from clip_rng(seed, r) for its step, exactly as on Ray Data. Parquet:
    each epoch in a permutation of all rows drawn from `local_shuffle_seed` (Ray Data's local shuffle
    buffer, taken to the whole set); rows are decoded as batches need them, from a few raw row
    groups held in memory (each clip's crop and flip depend on its id only: every epoch the same)."""

    def __init__(self, config: LoopConfig, total_steps: int, global_batch: int):
        self.config, self.total, self.batch = config, total_steps, global_batch
        self._index: list[tuple[int, int, int]] | None = None  # row -> (file, row group, row in group)
        self._files: list = []
        self._groups: OrderedDict = OrderedDict()  # (file, group) -> raw columns, least recent first
        self._sampler: SampleVideoClips | None = None
        self._start = 0

    def seek(self, step: int) -> None:
        self._start = max(0, int(step))

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool = True, local_shuffle_buffer_size=None,
                           local_shuffle_seed: int | None = None, collate_fn=None, device="cpu", pin_memory=False,
                           **_ignored):
        import torch

        from pipeline.train.input import SampleVideoClips, video_rows

        data, tp = self.config.data, self.config.train
        make: Callable[[np.ndarray], dict[str, np.ndarray]]  # clip numbers or row ids -> columns
        if data.kind == "parquet":
            n = len(self._row_index())
            order = (np.random.default_rng(local_shuffle_seed).permutation(n) if local_shuffle_buffer_size
                     else np.arange(n))
            batches = (order[i:i + batch_size] for i in range(0, n, batch_size))
            make = self._decode_rows
        else:
            if self._sampler is None:
                self._sampler = SampleVideoClips(
                    data, self.config.frames, tp.crop, tp.max_objects, self.config.seed, self.total,
                    self.batch, tp.max_skip, tp.skip_ramp, holdout(tp))
            sampler = self._sampler
            rows = video_rows(self.total, self.batch)
            first = min(rows, self._start * self.batch)
            batches = (np.arange(i, min(i + batch_size, rows)) for i in range(first, rows, batch_size))
            make = lambda ids: sampler({"id": ids})  # noqa: E731
        for ids in batches:
            if drop_last and len(ids) < batch_size:
                return
            columns = make(ids)
            out = collate_fn(columns) if collate_fn is not None else \
                {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in columns.items()}
            if torch.device(device).type != "cpu":
                out = {k: (v.pin_memory() if pin_memory else v).to(device, non_blocking=True) for k, v in out.items()}
            yield out

    # ------------------------------------------------------------------ Parquet rows on demand
    def _row_index(self) -> list[tuple[int, int, int]]:
        if self._index is None:
            import pyarrow.parquet as pq

            from pipeline import storage

            path = self.config.data.path
            if storage.is_uri(path):
                raise ValueError(f"{path}: in-process training reads local Parquet shards only (use Ray Data)")
            files = parquet_files(path)
            if not files:
                raise FileNotFoundError(f"{path}: no Parquet shards (run `stm synthesize` first)")
            self._files = [pq.ParquetFile(f) for f in files]
            self._index = [(f, g, r) for f, pf in enumerate(self._files) for g in range(pf.num_row_groups)
                           for r in range(pf.metadata.row_group(g).num_rows)]
        return self._index

    def _group(self, f: int, g: int) -> dict:
        key = (f, g)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        table = self._files[f].read_row_group(g, columns=["clip_id", "n_frames", "frames", "masks"])
        self._groups[key] = {k: table.column(k).to_numpy(zero_copy_only=False) for k in table.column_names}
        while len(self._groups) > ROW_GROUP_CACHE:
            self._groups.popitem(last=False)
        return self._groups[key]

    def _decode_rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        from pipeline.train.input import DecodeSynthetic, stack

        tp = self.config.train
        decode = DecodeSynthetic(tp.crop, tp.max_objects, self.config.seed)
        assert self._index is not None, "_decode_rows before _row_index"  # iter_torch_batches builds it first
        parts = []
        for row in rows.tolist():
            f, g, r = self._index[row]
            group = self._group(f, g)
            parts.append(decode({k: v[r:r + 1] for k, v in group.items()}))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else stack([], np.zeros(0))
