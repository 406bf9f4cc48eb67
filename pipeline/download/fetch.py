"""Resumable, checksummed HTTP downloads and safe archive extraction (stdlib only).

`fetch` streams to `<dest>.part` with a progress bar, resumes with HTTP Range after a dropped
connection (or a previous run), retries with exponential backoff, verifies size and md5/sha256,
and renames to `dest` only when whole and correct. `extract` unpacks zip/tar archives after
checking every member: no absolute paths, no `..`, no links or devices that reach outside.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}
USER_AGENT = "stm-vos-download/1.0"


class DownloadError(RuntimeError):
    pass


class ChecksumError(DownloadError):
    pass


class UnsafeArchiveError(DownloadError):
    pass


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, size: int | None = None, md5: str | None = None, sha256: str | None = None,
           what: str | None = None) -> None:
    """Raise ChecksumError naming `what` (default: the path) when size or digest differ."""
    what = what or str(path)
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise ChecksumError(f"{what}: size is {actual} bytes, expected {size}")
    for algo, want in (("md5", md5), ("sha256", sha256)):
        if want:
            got = file_digest(path, algo)
            if got.lower() != want.lower():
                raise ChecksumError(f"{what}: {algo} is {got}, expected {want}")


def fetch(url: str, dest: str | Path, *, size: int | None = None, md5: str | None = None,
          sha256: str | None = None, retries: int = 4, backoff: float = 1.0, timeout: float = 60.0,
          chunk: int = 1 << 20, progress: bool = True) -> Path:
    """Download `url` to `dest` (see module doc). An existing, verified `dest` is kept as is."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        verify(dest, size, md5, sha256)
        return dest
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _stream(url, part, size, timeout, chunk, progress)
            break
        except urllib.error.HTTPError as err:
            if err.code not in RETRYABLE_HTTP or attempt == retries:
                raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as err:
            if attempt == retries:
                raise DownloadError(f"{url}: failed after {retries + 1} attempts: {err}; "
                                    f"run again to resume from {part}") from err
        time.sleep(backoff * 2**attempt)
    try:
        verify(part, size, md5, sha256, what=url)
    except ChecksumError as err:
        part.unlink(missing_ok=True)  # a corrupt file must not be resumed or used
        raise ChecksumError(f"{err}; the download was deleted, run again to retry") from err
    os.replace(part, dest)
    return dest


def _stream(url: str, part: Path, size: int | None, timeout: float, chunk: int, progress: bool) -> None:
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    if size is not None and have == size:
        return
    if size is not None and have > size:
        part.unlink()
        have = 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing past what we have: the file is complete (verify decides)
            return
        raise
    with response:
        status = getattr(response, "status", 200)
        if have and status == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != have:
                raise DownloadError(f"{url}: asked to resume at byte {have}, server sent from {start}")
            mode = "ab"
        else:  # the server ignored Range (200): start over
            have, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        total = size if size is not None else (have + expected if expected is not None else None)
        got = 0
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=part.name.removesuffix(".part"), disable=not progress,
                                         leave=False) as bar:
            while True:
                block = response.read(chunk)
                if not block:
                    break
                f.write(block)
                got += len(block)
                bar.update(len(block))
        if expected is not None and got < expected:
            raise http.client.IncompleteRead(b"", expected - got)


def _content_range_start(value: str) -> int | None:
    # "bytes 100-999/1000"
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


# --------------------------------------------------------------------------- extraction


def _safe_target(dest: Path, name: str, archive: Path) -> Path:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path")
    if ".." in pure.parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} escapes the target folder ('..')")
    target = (dest / pure).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise UnsafeArchiveError(f"{archive}: member {name!r} escapes the target folder")
    return target


def extract(archive: str | Path, dest: str | Path) -> None:
    """Unpack a zip or tar (any compression) into `dest`, refusing unsafe members before writing any."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, dest)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, dest)
    else:
        raise DownloadError(f"{archive}: not a zip or tar archive (corrupt or truncated?)")


def _extract_zip(archive: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _safe_target(dest, info.filename, archive)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symbolic link; links are refused")
            bad = zf.testzip()
            if bad is not None:
                raise DownloadError(f"{archive}: member {bad!r} is corrupt (CRC mismatch)")
            zf.extractall(dest)
    except zipfile.BadZipFile as err:
        raise DownloadError(f"{archive}: corrupt zip: {err}") from err


def _extract_tar(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                target = _safe_target(dest, m.name, archive)
                if m.issym() or m.islnk():
                    link = PurePosixPath(m.linkname)
                    base = target.parent if m.issym() else dest.resolve()
                    resolved = (base / link).resolve() if not link.is_absolute() else Path(link)
                    if link.is_absolute() or not resolved.is_relative_to(dest.resolve()):
                        raise UnsafeArchiveError(f"{archive}: link {m.name!r} -> {m.linkname!r} points outside the target folder")
                elif not (m.isfile() or m.isdir()):
                    raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device or fifo; refused")
            tf.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError) as err:
        raise DownloadError(f"{archive}: corrupt or truncated tar: {err}") from err


def copy_tree(src: Path, dest: Path) -> None:
    """Copy a folder (hard links when on the same filesystem: fast and no extra space)."""
    def link_or_copy(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dest, copy_function=link_or_copy, symlinks=False)
