"""Where artefacts live: local paths (the embedded default) or URIs every node reaches.

A URI is `s3://bucket/prefix`, `gs://bucket/prefix` or `file:///shared/mount/...`, opened through
pyarrow's filesystems. S3-compatible stores off AWS take their endpoint from `AWS_ENDPOINT_URL`
(the variable boto3 and pyarrow read; MLflow's `MLFLOW_S3_ENDPOINT_URL` is honoured as a fallback),
so the same params work against AWS, MinIO or a loopback test server.

`storage.root` (params section `storage`) names the store on a cluster. Stages keep their DVC
outputs local (DVC tracks them there) and mirror what other nodes read into `<root>/<same path>`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMES = ("s3://", "gs://", "gcs://", "file://")


class StorageError(ValueError):
    pass


ROOT_ENV = "STM_STORAGE_ROOT"  # the cluster files set it, so params-paper.yaml itself needs no edit


@dataclass
class StorageParams:
    """params section `storage`."""

    root: str = ""  # "" keeps every artefact on this machine (or $STM_STORAGE_ROOT); a cluster: a URI every node reaches
    cache_mb: float = 0.0  # node-local cache of store files read by workers, per process, in MiB (0: only the files being read)


def storage_root(params: dict) -> str:
    """storage.root from params, else $STM_STORAGE_ROOT, else "" (local). Checked when set."""
    from pipeline.params import section

    root = section(params, "storage", StorageParams).root or os.environ.get(ROOT_ENV, "")
    return check_uri(root, "storage.root" if section(params, "storage", StorageParams).root else ROOT_ENV) if root else ""


def is_uri(location: str | Path) -> bool:
    return isinstance(location, str) and "://" in location


def check_uri(uri: str, what: str = "storage URI") -> str:
    if not uri.startswith(SCHEMES):
        raise StorageError(f"{what} {uri!r}: unsupported scheme; use one of {', '.join(SCHEMES)}")
    return uri.rstrip("/")


def join(base: str, *parts: str) -> str:
    """URI join that keeps `s3://` intact and drops `./` segments of relative params paths."""
    cleaned = [p.strip("/") for p in parts if p and p.strip("/") not in ("", ".")]
    cleaned = [p[2:] if p.startswith("./") else p for p in cleaned]
    return "/".join([base.rstrip("/"), *cleaned])


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None


def filesystem(uri: str):
    """-> (pyarrow FileSystem, path inside it). S3 gets the endpoint explicitly, so a pickled
    filesystem (Ray Train's `storage_filesystem`, Ray Data tasks) carries it to every node."""
    import pyarrow.fs as pafs

    uri = check_uri(uri)
    if uri.startswith("s3://"):
        url = endpoint()
        kwargs = {}
        if url:
            scheme, _, host = url.partition("://")
            kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://"):]
    if uri.startswith("gcs://"):
        uri = "gs://" + uri[len("gcs://"):]
    return pafs.FileSystem.from_uri(uri)


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError) as err:
        raise FileNotFoundError(f"{uri}: cannot read ({err})") from err


def write_bytes(uri: str, data: bytes) -> None:
    """Object stores publish a whole object on close; on a file:// mount write a temp file and rename."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if uri.startswith("file://"):
        tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.tmp-{os.getpid()}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def list_files(uri: str) -> list[str]:
    """Paths (relative to `uri`) of the files below it; [] when there is nothing."""
    import pyarrow.fs as pafs

    fs, base = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return []
    return sorted(i.path[len(base):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass


def upload_dir(local: Path, uri: str) -> int:
    """Copy the folder `local` to `uri` (stale files under `uri` removed first). -> files copied."""
    import pyarrow.fs as pafs

    if not local.is_dir():
        raise FileNotFoundError(f"{local}: folder to upload to {uri} not found")
    delete_dir(uri)
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local.resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                    use_threads=True)
    return sum(1 for p in local.rglob("*") if p.is_file())


def download_dir(uri: str, local: Path) -> Path:
    """Copy everything under `uri` into the folder `local`, replaced atomically."""
    import pyarrow.fs as pafs

    if not list_files(uri):
        raise FileNotFoundError(f"{uri}: nothing stored there")
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}.tmp-", dir=local.parent))
    fs, path = filesystem(uri)
    pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                    use_threads=True)
    old = local.with_name(f".{local.name}.old-{os.getpid()}")
    if local.exists():
        os.replace(local, old)
    os.replace(tmp, local)
    shutil.rmtree(old, ignore_errors=True)
    return local


def node_cache(uri: str, cache_root: str | None = None) -> Path:
    """A copy of the whole folder at `uri` on this node's local disk: for small inputs only (training
    and synthesis read the store file by file: `StoreFile`). Filled once per node and URI; concurrent callers on
    one node wait for the first (a lock file) instead of copying twice."""
    import fcntl

    root = Path(cache_root or os.environ.get("STM_NODE_CACHE") or Path(tempfile.gettempdir()) / "stm-node-cache")
    try:  # a republished mirror (new fingerprint) is a new cache entry, never a stale hit
        version = read_bytes(join(uri, MIRROR_MARK))
    except FileNotFoundError:
        version = b""
    key = hashlib.sha256(uri.encode() + b"\0" + version).hexdigest()[:16]
    target = root / key
    done = root / f"{key}.done"
    if done.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            download_dir(uri, target)
            done.write_text(f"{uri}\n{time.time()}\n")
    return target


class FileCache:
    """A bounded node-local cache of single store files, one per process (the readers open files by
    path). `limit_mb` 0 keeps only the few files being read; older files go first. The folder is
    removed when the process exits, and folders of processes that died are swept at start."""

    KEEP = 8  # files kept whatever the limit: a clip reads a frame and its mask one after the other

    def __init__(self, limit_mb: float = 0.0, root: str | None = None):
        import atexit
        from collections import OrderedDict

        base = Path(root or os.environ.get("STM_NODE_CACHE") or Path(tempfile.gettempdir()) / "stm-store-cache")
        base.mkdir(parents=True, exist_ok=True)
        for old in base.glob("pid-*"):  # left by a process that was killed
            try:
                os.kill(int(old.name[4:]), 0)
            except (ValueError, ProcessLookupError):
                shutil.rmtree(old, ignore_errors=True)
            except PermissionError:
                pass
        self.dir = base / f"pid-{os.getpid()}"
        self.dir.mkdir(exist_ok=True)
        self.limit = int(limit_mb * 2**20)
        self.files: OrderedDict[str, tuple[Path, int]] = OrderedDict()
        self.fetched = 0  # bytes read from the store
        atexit.register(shutil.rmtree, self.dir, True)

    def path(self, uri: str) -> Path:
        if uri in self.files:
            self.files.move_to_end(uri)
            return self.files[uri][0]
        data = read_bytes(uri)
        self.fetched += len(data)
        local = self.dir / f"{hashlib.sha256(uri.encode()).hexdigest()[:20]}{Path(uri).suffix}"
        tmp = local.with_name(local.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, local)
        self.files[uri] = (local, len(data))
        total = sum(size for _, size in self.files.values())
        while len(self.files) > self.KEEP and total > self.limit:
            _, (old, size) = self.files.popitem(last=False)
            old.unlink(missing_ok=True)
            total -= size
        return local


_CACHES: dict[float, FileCache] = {}


def file_cache(limit_mb: float = 0.0) -> FileCache:
    """This process's cache of store files (one per limit)."""
    if limit_mb not in _CACHES:
        _CACHES[limit_mb] = FileCache(limit_mb)
    return _CACHES[limit_mb]


class StoreFile(os.PathLike):
    """A file in the store that readers open by path (`Path(f)`, PIL, numpy): the path is this
    process's cached copy, fetched when first opened. Has the name parts sorting and matching use."""

    def __init__(self, uri: str, cache_mb: float = 0.0):
        self.uri, self.cache_mb = uri, cache_mb
        self.name = uri.rsplit("/", 1)[-1]
        self.suffix = Path(self.name).suffix
        self.stem = self.name[: -len(self.suffix)] if self.suffix else self.name

    @property
    def parent(self) -> StoreFile:
        return StoreFile(self.uri.rsplit("/", 1)[0], self.cache_mb)

    def __fspath__(self) -> str:
        return str(file_cache(self.cache_mb).path(self.uri))

    def read_bytes(self) -> bytes:
        """The file's bytes straight from the store (Path.read_bytes; nothing written to the node's disk)."""
        return read_bytes(self.uri)

    def __repr__(self) -> str:
        return self.uri

    __str__ = __repr__


def object_checksums(uri: str, names: list[str]) -> list[dict]:
    """Size, Parquet rows and SHA-256 of each object `uri/name`, computed by Ray tasks beside the
    store (each streams its object; nothing is kept): the manifest DVC tracks instead of the data."""
    import ray

    @ray.remote(num_cpus=0)
    def one(name: str) -> dict:
        import pyarrow.parquet as pq

        fs, path = filesystem(join(uri, name))
        h, size = hashlib.sha256(), 0
        with fs.open_input_stream(path) as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
                size += len(chunk)
        rows = pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows if name.endswith(".parquet") else None
        return {"path": name, "size": size, "rows": rows, "sha256": h.hexdigest()}

    return sorted(ray.get([one.remote(n) for n in names]), key=lambda o: o["path"])


def local_or_cached(location: str | Path) -> Path:
    """A local folder for `location`: itself when local, else this node's cached copy of the URI."""
    return node_cache(str(location)) if is_uri(location) else Path(location)


def remote_mirror(root: str, workspace: Path, local: Path) -> str | None:
    """`<root>/<path of local inside the workspace>`, or None when no store is configured.
    Paths outside the workspace mirror under `<root>/external/<name>`."""
    if not root:
        return None
    try:
        rel = local.resolve().relative_to(workspace.resolve()).as_posix()
    except ValueError:
        rel = f"external/{local.name}"
    return join(check_uri(root, "storage.root"), rel)


def fingerprint(path: Path, limit: int = 50_000) -> str:
    """Names and sizes of the files under `path` (or a file's bytes): cheap, and it changes when the
    data set is regenerated with other settings."""
    h = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    elif path.is_dir():
        for i, p in enumerate(sorted(path.rglob("*"))):
            if i >= limit:
                break
            if p.is_file():
                h.update(f"{p.relative_to(path)}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def _store_manifest(local: Path) -> list[dict] | None:
    """The store objects a synthesised set's local manifest lists, or None for an ordinary folder."""
    import json

    try:
        objects = json.loads((local / "_manifest.json").read_text()).get("objects")
    except (OSError, ValueError, AttributeError):
        return None
    return objects or None


MIRROR_MARK = "_stm_mirror.json"  # "_" prefix: Parquet readers and the video readers skip it


def publish(local: Path, uri: str) -> bool:
    """Mirror the folder `local` at `uri` unless the store already holds this exact content
    (same fingerprint). -> True when files were copied."""
    import json

    objects = _store_manifest(local)
    if objects is not None:  # the data live in the store already (synthesised there): check, copy nothing
        have = {f"{o['path']}": o["size"] for o in objects}
        fs, base = filesystem(uri)
        for name, size in have.items():
            info = fs.get_file_info(f"{base}/{name}")
            if info.size != size:
                raise StorageError(f"{local}/_manifest.json lists {join(uri, name)} ({size} bytes) but the store "
                                   f"has {'no such object' if info.size is None else f'{info.size} bytes'}; "
                                   "run `stm synthesize` again")
        return False
    mark = join(uri, MIRROR_MARK)
    want = fingerprint(local)
    try:
        if json.loads(read_bytes(mark)).get("fingerprint") == want:
            return False
    except (FileNotFoundError, ValueError):
        pass
    upload_dir(local, uri)
    write_bytes(mark, json.dumps({"fingerprint": want, "source": str(local)}).encode())
    return True
