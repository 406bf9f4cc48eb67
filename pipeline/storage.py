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
    """A copy of the folder at `uri` on this node's local disk (Ray workers on nodes that share no
    disk with the driver read inputs this way). Filled once per node and URI; concurrent callers on
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


def local_or_cached(location: str | Path) -> Path:
    """A local folder for `location`: itself when local, else this node's cached copy of the URI."""
    return node_cache(location) if is_uri(location) else Path(location)


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


MIRROR_MARK = "_stm_mirror.json"  # "_" prefix: Parquet readers and the video readers skip it


def publish(local: Path, uri: str) -> bool:
    """Mirror the folder `local` at `uri` unless the store already holds this exact content
    (same fingerprint). -> True when files were copied."""
    import json

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
