"""The input root of `stm segment --dataset/--videos` as one listing: a local folder or a store URI.

`Tree.scan(root)` lists the files below the root once (`os.walk`, or one recursive listing of the
store: names, sizes, modification times), so the driver finds every video and fingerprints its
inputs without reading or copying a file. `Inputs(root) / rel` is what a worker opens: the local
path, or a `storage.StoreFile` fetched into this process's bounded cache when first read (frames,
masks and video files by key; nothing copies the dataset). A missing root or an unknown scheme is
a `DataError` naming the URI, before any work.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pipeline import storage
from stm_core.data.io import DataError


@dataclass
class Tree:
    root: str  # a local folder or a store URI
    files: dict[str, tuple[int, int]] = field(default_factory=dict)  # posix rel path -> (bytes, mtime ns)
    _by_dir: tuple[dict[str, list[str]], dict[str, set[str]]] | None = field(default=None, repr=False)

    @classmethod
    def scan(cls, root: str | Path) -> Tree:
        root = str(root)
        if not storage.is_uri(root):
            base = Path(root)
            if not base.is_dir():
                raise DataError(f"{root}: input folder not found")
            files = {}
            for folder, dirs, names in os.walk(base, followlinks=True):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in names:
                    if name.startswith("."):
                        continue
                    st = os.stat(os.path.join(folder, name))
                    rel = Path(folder, name).relative_to(base).as_posix()
                    files[rel] = (st.st_size, st.st_mtime_ns)
            return cls(root, files)
        return cls(root, _store_files(root))

    # ------------------------------------------------------------------ questions about names
    def where(self, rel: str) -> str:
        """The file or folder as a message names it."""
        return storage.join(self.root, rel) if storage.is_uri(self.root) else str(Path(self.root, rel))

    def has(self, rel: str) -> bool:
        return rel in self.files

    def _index(self) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
        """({folder: its file names}, {folder: its subfolder names}), built once (listings stay linear)."""
        if self._by_dir is None:
            files: dict[str, list[str]] = {}
            subdirs: dict[str, set[str]] = {}
            for key in sorted(self.files):
                parent, _, name = key.rpartition("/")
                files.setdefault(parent, []).append(name)
                while parent:
                    up, _, child = parent.rpartition("/")
                    if child in subdirs.setdefault(up, set()):
                        break
                    subdirs[up].add(child)
                    parent = up
            self._by_dir = (files, subdirs)
        return self._by_dir

    def is_dir(self, rel: str) -> bool:
        files, subdirs = self._index()
        rel = rel.strip("/")
        return rel in files or rel in subdirs

    def dirs(self, rel: str) -> list[str]:
        """Names of the folders directly inside `rel`."""
        return sorted(self._index()[1].get(rel.strip("/"), ()))

    def names(self, rel: str) -> list[PurePosixPath]:
        """Files directly inside `rel`, as relative paths."""
        rel = rel.strip("/")
        return [PurePosixPath(rel, n) for n in self._index()[0].get(rel, [])]

    def read_text(self, rel: str) -> str:
        if storage.is_uri(self.root):
            return storage.read_bytes(storage.join(self.root, rel)).decode()
        return Path(self.root, rel).read_text()

    def fingerprint(self, rels: list[str]) -> str:
        """A digest of the files' names, sizes and modification times (no file is read)."""
        digest = hashlib.sha256()
        for rel in sorted(rels):
            size, mtime = self.files.get(rel, (-1, -1))
            digest.update(f"{rel}\0{size}\0{mtime}\n".encode())
        return digest.hexdigest()[:20]


def _store_files(root: str) -> dict[str, tuple[int, int]]:
    import pyarrow.fs as pafs

    try:
        fs, base = storage.filesystem(root)
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except storage.StorageError as err:
        raise DataError(str(err)) from err
    except (OSError, ValueError) as err:  # no such bucket, no access, no endpoint
        raise DataError(f"{root}: cannot list this store location ({err})") from err
    files = {}
    for info in infos:
        rel = info.path[len(base):].lstrip("/")
        if info.type == pafs.FileType.File and not any(p.startswith(".") for p in rel.split("/")):
            mtime = info.mtime_ns if info.mtime_ns is not None else -1
            files[rel] = (int(info.size or 0), int(mtime))
    if not files:
        raise DataError(f"{root}: nothing found at this store location (a mistyped bucket or prefix?)")
    return files


class Inputs:
    """What a worker opens: `Inputs(root) / rel` -> a local Path, or a store file in this process's cache."""

    def __init__(self, root: str, cache_mb: float = 0.0):
        self.root, self.cache_mb = root, cache_mb

        self.fetched: dict[str, str] = {}  # cached copy -> URI (to name the URI in messages)

    def where(self, rel: str) -> str:
        return storage.join(self.root, rel) if storage.is_uri(self.root) else str(Path(self.root, rel))

    def path(self, rel: str) -> Path:
        """A local path to read: the file itself, or this process's cached copy of the store file."""
        if not storage.is_uri(self.root):
            return Path(self.root, rel)
        uri = storage.join(self.root, rel)
        try:
            local = Path(os.fspath(storage.StoreFile(uri, self.cache_mb)))
        except FileNotFoundError as err:
            raise DataError(f"{uri}: file not found in the store") from err
        self.fetched[str(local)] = uri
        return local

    def unname(self, message: str) -> str:
        """`message` with cached copies named by their URIs."""
        for local, uri in self.fetched.items():
            message = message.replace(local, uri)
        return message
