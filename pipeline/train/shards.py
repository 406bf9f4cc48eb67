"""Reading clip shards: Parquet files for Ray Data (a folder, a URI, or the store objects a shard
manifest lists); `LocalShard` (pipeline/train/local_shard.py) reads them in-process.

A clip set synthesised with `storage.root` set lives once, in the store; its DVC output is the
folder's `_manifest.json`, which lists each store object with its size, rows and SHA-256. Readers
take the manifest (the same file is in the store beside the shards) and read exactly those objects.
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "_manifest.json"  # "_" prefix: Parquet readers (pyarrow, Ray Data) skip it in a folder
ROW_GROUP_CACHE = 4  # raw (undecoded) row groups an in-process shard keeps in memory


def store_objects(location: str) -> list[dict] | None:
    """The objects a shard manifest at `location` lists (each: path, size, rows, sha256), or None
    when there is no manifest of store objects there."""
    from pipeline import storage

    try:
        raw = storage.read_bytes(storage.join(location, MANIFEST)) if storage.is_uri(location) else \
            (Path(location) / MANIFEST).read_bytes()
        objects = json.loads(raw).get("objects")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return objects or None


def parquet_files(location: str) -> list[str]:
    """The Parquet files of a clip set: the manifest's objects (under `location`), else the folder's files."""
    from pipeline import storage

    objects = store_objects(location)
    if objects is not None:
        return [storage.join(location, o["path"]) if storage.is_uri(location) else str(Path(location) / o["path"])
                for o in objects]
    if storage.is_uri(location):
        return [storage.join(location, f) for f in storage.list_files(location) if f.endswith(".parquet")]
    return [str(p) for p in sorted(Path(location).glob("*.parquet"))]


def open_parquet(file: str):
    """A pyarrow ParquetFile over a local file or a store object: only the row groups read are fetched."""
    import pyarrow.parquet as pq

    from pipeline import storage

    if not storage.is_uri(file):
        return pq.ParquetFile(file)
    fs, path = storage.filesystem(file)
    return pq.ParquetFile(fs.open_input_file(path))


def read_parquet(location: str):
    """A Ray Data dataset of the clip rows at `location` (streamed: each task reads its own files)."""
    import ray

    from pipeline import storage

    paths = parquet_files(location)
    if not paths:
        raise FileNotFoundError(f"{location}: no Parquet shards (run `stm synthesize` first)")
    if storage.is_uri(location):
        fs, _ = storage.filesystem(location)
        return ray.data.read_parquet([storage.filesystem(p)[1] for p in paths], filesystem=fs)
    return ray.data.read_parquet(paths)
