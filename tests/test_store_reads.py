"""Reads by key from a store (a file:// URI here): the plateau schedule's validation clips, the
benchmark's sequences, and the finished evaluation items kept under `storage.root`. None of them
copies a whole set onto the node (`storage.node_cache` marks each copy it makes with a `.done` file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage


def whole_set_copies(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.done")) if cache.is_dir() else []


def write_val_clips(folder: Path, clips: int, frames: int = 2, size: int = 24) -> None:
    """`stm synthesize`'s row layout (JPEG frames, palette PNG masks), two rows per row group."""
    from stm_core.data.io import encode_image, index_mask_png

    rng = np.random.default_rng(0)
    rows = []
    for i in range(clips):
        images = rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8)
        masks = np.zeros((frames, size, size), np.uint8)
        masks[:, 4:14, 4:14] = 1
        rows.append({"clip_id": i, "n_frames": frames, "frames": [encode_image(f) for f in images],
                     "masks": [index_mask_png(m) for m in masks]})
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "clips-00000.parquet", row_group_size=2)


def test_plateau_validation_clips_are_read_from_the_store_by_key(tmp_path: Path, monkeypatch) -> None:
    from pipeline.train.schedule import VAL_DIR, parquet_validation_clips

    cache = tmp_path / "node-cache"
    monkeypatch.setenv("STM_NODE_CACHE", str(cache))
    write_val_clips(tmp_path / "store" / "strmn" / VAL_DIR, clips=5)
    remote = parquet_validation_clips((tmp_path / "store" / "strmn").as_uri(), 3, crop=16, max_objects=2, seed=0)
    local = parquet_validation_clips(str(tmp_path / "store" / "strmn"), 3, crop=16, max_objects=2, seed=0)
    assert len(remote) == 3 and remote[0][0].shape == (2, 16, 16, 3) and remote[0][1].shape == (2, 16, 16)
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(remote, local))  # the same clips
    assert whole_set_copies(cache) == [] and not cache.exists()
    with pytest.raises(FileNotFoundError, match="_val: no validation clips"):
        parquet_validation_clips((tmp_path / "store" / "empty").as_uri(), 3, crop=16, max_objects=2, seed=0)


def test_evaluation_sequences_stream_from_the_store(tmp_path: Path, monkeypatch) -> None:
    from pipeline.evaluate.inputs import load_sequences, object_count, payload
    from pipeline.evaluate.settings import EvaluateParams
    from stm_core.data.builtin_videos import BuiltinVideosConfig, write_builtin_videos

    cache = tmp_path / "node-cache"
    monkeypatch.setenv("STM_NODE_CACHE", str(cache))
    root = tmp_path / "videos"
    write_builtin_videos(root, BuiltinVideosConfig(height=32, width=32, frames=4, train_sequences=1, val_sequences=3), 0)
    local = load_sequences(EvaluateParams(dataset=str(root), split="val", max_sequences=2))
    remote = load_sequences(EvaluateParams(dataset=root.as_uri(), split="val", max_sequences=2))
    assert [s.name for s in remote] == [s.name for s in local] and len(remote) == 2
    for a, b in zip(remote, local):
        assert payload(a) == payload(b) and object_count(a) == object_count(b)
    picked = load_sequences(EvaluateParams(dataset=root.as_uri(), split="val", sequences=[local[1].name]))
    assert [s.name for s in picked] == [local[1].name]
    assert whole_set_copies(cache) == []  # only single files, in the bounded per-process cache


def test_finished_items_are_kept_under_the_storage_root(tmp_path: Path) -> None:
    from pipeline.evaluate.records import ItemRecords, records_dir

    work = tmp_path / "work"
    store = (tmp_path / "store").as_uri()
    assert records_dir(work / "results", "", work) == work / "results.partial"
    where = records_dir(work / "results", store, work)
    assert where == storage.join(store, "results.partial")
    records = ItemRecords(where)
    assert not records.has("a") and records.count() == 0
    records.save("a", {"score": np.float64(0.5)}, {"00000.png": b"png"})
    again = ItemRecords(records_dir(work / "results", store, work))  # another run, another machine
    assert again.has("a") and again.count() == 1
    assert again.load("a") == ({"score": 0.5}, {"00000.png": b"png"})
    again.clear()
    assert not records.has("a") and storage.list_files(str(where)) == []
