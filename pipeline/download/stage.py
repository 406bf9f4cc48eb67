"""Fetch the datasets named in params (`download.sources`) into data/raw/<source>/.

Three kinds of source: `builtin` (generated offline from scikit-image's sample images, seeded),
remote ones from `pipeline.download.catalog` (`stm download --list`: official URLs, checked against
published checksums where there are any), and `local` ones (a folder, an archive or a file://
URL, given in `download.sources.<name>.path`; datasets behind a login, such as YouTube-VOS,
come this way).
Each source is built in a temp folder next to its target and renamed into place with a
`.complete` marker only when whole, so a failed or corrupt download never looks finished; an
up-to-date source is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.download.catalog import REGISTRY, RemoteFile, Source
from pipeline.download.fetch import DownloadError, copy_tree, extract, fetch
from pipeline.download.prepare import prepare
from pipeline.params import DEFAULT_PARAMS, ParamsError, from_dict, load_params
from pipeline.tracking import workspace_root
from stm_core.data.builtin import BuiltinImagesConfig, write_builtin_images
from stm_core.data.builtin_videos import BuiltinVideosConfig, write_builtin_videos
from stm_core.data.io import DataError

MARKER = ".complete"


@dataclass
class SourceOverride:
    """Settings of a registry or local source (`download.sources.<name>`; `{}`: as published)."""

    path: str = ""  # local folder, archive or file:// URL to use instead of downloading
    url: str = ""  # a mirror to download from instead of the official URL (single-file sources)
    layout: str = ""  # how to arrange it: davis | youtube-vos | images | saliency | voc | sbd | coco | raw
    verify: bool = True  # check published sizes/checksums (turn off for a mirror with other files)


@dataclass
class BuiltinImagesSource(BuiltinImagesConfig):
    """`download.sources.builtin-images`: the generator's settings and its seed."""

    seed: int = 0  # seed of the generated images


@dataclass
class BuiltinVideosSource(BuiltinVideosConfig):
    """`download.sources.builtin-videos`: the generator's settings and its seed. The built-in
    benchmark's values replace the generator's small defaults (tests make tiny sets from those)."""

    frames: int = 80  # frames per sequence
    val_sequences: int = 3  # sequences in ImageSets/2017/val.txt
    object_size: list[float] = field(default_factory=lambda: [0.4, 0.55])  # [min, max] side / frame side
    enter_prob: float = 0.5  # chance that the last object (of 2+) enters mid-video
    seed: int = 0  # seed of the generated videos


BUILTIN: dict[str, type] = {"builtin-images": BuiltinImagesSource, "builtin-videos": BuiltinVideosSource}


@dataclass(kw_only=True)
class DownloadParams:
    """params.yaml section `download`. Each `download@<name>` stage reads `root` and its own
    `sources.<name>` only (so adding a source re-runs no other); the other keys only say where
    archives go and how hard to retry, which never changes a dataset (pipeline.params.PLACEMENT_KEYS)."""

    sources: dict[str, dict]  # name -> settings (params.yaml names the built-in sets)
    root: str = "data/raw"  # each source lands in <root>/<name>/
    cache: str = "data/downloads"  # downloaded archives (kept for resuming and re-extraction)
    keep_archives: bool = True  # keep archives in the cache after extraction
    retries: int = 4  # retries per file, with exponential backoff
    timeout: float = 60.0  # seconds without data before a retry


def read_params(params: dict, only: list[str] | None = None) -> tuple[DownloadParams, dict[str, object]]:
    """-> (the common settings, {source name: its settings}) for `only` (default: every source),
    reading no other source's entry."""
    where = f"{params.get('__file__', DEFAULT_PARAMS)}: download"
    raw = params.get("download")
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping, got {raw!r}")
    known = {f.name for f in dataclasses.fields(DownloadParams)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    # the common keys alone (from_dict names a missing `sources`): each source's entry is read, and
    # tracked by DVC, only when chosen
    common = from_dict(DownloadParams, {k: ({} if k == "sources" else raw[k]) for k in known if k in raw}, where)
    sources = raw["sources"]
    if not isinstance(sources, dict):
        raise ParamsError(f"{where}.sources: expected a mapping of source name -> settings ({{}} for none), "
                          f"got {sources!r}")
    names = only or list(sources)
    missing = [n for n in names if n not in sources]
    if missing:
        raise ParamsError(f"{where}.sources: no entry for {missing}; add `<name>: {{}}` under download.sources")
    chosen: dict[str, object] = {}
    for name in names:
        entry = sources[name]
        entry = {} if entry is None else entry
        chosen[name] = from_dict(BUILTIN.get(name, SourceOverride), entry, f"{where}.sources.{name}")
    return common, chosen


def marker_for(name: str, kind: str, details: dict) -> dict:
    """What `.complete` holds: enough to tell whether the folder matches the params (no timestamps,
    so DVC sees identical outputs on identical runs)."""
    return {"source": name, "kind": kind, **details}


def is_complete(target: Path, marker: dict | None = None) -> bool:
    path = target / MARKER
    if not path.is_file():
        return False
    if marker is None:
        return True
    try:
        return json.loads(path.read_text()) == json.loads(json.dumps(marker))
    except json.JSONDecodeError:
        return False


def build_into(target: Path, marker: dict, build) -> bool:
    """Run `build(tmp_dir)`, then atomically put tmp_dir at `target` with its marker.
    Returns False when `target` was already complete for this marker (nothing done)."""
    if is_complete(target, marker):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.partial-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        tmp.mkdir()
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists() or target.is_symlink():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _local_path(spec: str, root: Path) -> Path:
    if spec.startswith("file://"):
        parsed = urllib.parse.urlparse(spec)
        return Path(urllib.parse.unquote(parsed.path))
    p = Path(spec).expanduser()
    return p if p.is_absolute() else root / p


def fetch_local(name: str, path: Path, layout: str, target: Path) -> bool:
    if not path.exists():
        raise DownloadError(f"{path}: local source {name!r} not found")
    stat = path.stat()
    marker = marker_for(name, "local", {"path": str(path), "layout": layout,
                                         "size": stat.st_size if path.is_file() else None})

    def build(tmp: Path) -> None:
        src = tmp / ".src"
        if path.is_dir():
            copy_tree(path, src)
        else:
            extract(path, src)
        prepare(layout, src, tmp)

    return build_into(target, marker, build)


def fetch_remote(source: Source, p: DownloadParams, override: SourceOverride, cache: Path, target: Path) -> bool:
    files = list(source.files)
    if override.url:
        if len(files) != 1:
            raise ParamsError(f"download.sources.{source.name}.url: {source.name} has {len(files)} files; "
                              f"a mirror URL replaces one file only (use `path` with a local copy instead)")
        f = files[0]
        files = [RemoteFile(override.url, f.filename, f.size, f.md5, f.sha256)]
    if not override.verify:
        files = [RemoteFile(f.url, f.filename) for f in files]
    layout = override.layout or source.layout
    marker = marker_for(source.name, "remote", {"layout": layout, "files": [asdict(f) for f in files]})
    if is_complete(target, marker):
        return False
    archives = [fetch(f.url, cache / f.filename, size=f.size, md5=f.md5, sha256=f.sha256, retries=p.retries,
                      timeout=p.timeout) for f in files]

    def build(tmp: Path) -> None:
        src = tmp / ".src"
        for archive in archives:
            extract(archive, src)
        prepare(layout, src, tmp)

    done = build_into(target, marker, build)
    if not p.keep_archives:
        for archive in archives:
            archive.unlink(missing_ok=True)
    return done


def fetch_builtin(name: str, cfg: BuiltinImagesSource | BuiltinVideosSource, target: Path) -> bool:
    # the writer and the config class are picked by the same name, so they always match
    write: Callable[[Path, Any, int], object] = (write_builtin_images if name == "builtin-images"
                                                 else write_builtin_videos)
    base = BuiltinImagesConfig if name == "builtin-images" else BuiltinVideosConfig
    config = base(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(base)})
    marker = marker_for(name, "builtin", {"seed": cfg.seed, "config": asdict(config)})
    return build_into(target, marker, lambda tmp: write(tmp, config, cfg.seed))


def fetch_source(name: str, p: DownloadParams, settings: object, root: Path) -> bool:
    """Make `<root>/<download.root>/<name>` complete; True when something was (re)built."""
    raw, cache = _local_path(p.root, root), _local_path(p.cache, root)
    target = raw / name
    if name in BUILTIN:
        return fetch_builtin(name, settings, target)  # type: ignore[arg-type]
    override = settings if isinstance(settings, SourceOverride) else SourceOverride()
    source = REGISTRY.get(name)
    if override.path:
        layout = override.layout or (source.layout if source else "")
        if not layout:
            raise ParamsError(f"download.sources.{name}.layout: say how {name!r} is laid out "
                              f"(davis, youtube-vos, images, saliency, voc, sbd, coco or raw)")
        return fetch_local(name, _local_path(override.path, root), layout, target)
    if source is None:
        known = sorted([*REGISTRY, *BUILTIN])
        raise ParamsError(f"download.sources: unknown source {name!r}; known: {known}, or give "
                          f"download.sources.{name}.path for a local one")
    if not source.files:  # behind a login: only a local copy will do
        raise DownloadError(f"{name}: {source.instructions} Then set download.sources.{name}.path in "
                            f"params.yaml to the downloaded archive or its extracted folder.")
    return fetch_remote(source, p, override, cache, target)


def run_download(params_file: str | Path, only: list[str] | None = None) -> list[str]:
    p, chosen = read_params(load_params(params_file), only)
    root = workspace_root(params_file)  # inputs and outputs: the temp copy under a queued experiment
    built = []
    for name, settings in chosen.items():
        print(f"download: {name} ...", file=sys.stderr)
        changed = fetch_source(name, p, settings, root)
        print(f"download: {name}: {'done' if changed else 'up to date'} ({_local_path(p.root, root) / name})",
              file=sys.stderr)
        if changed:
            built.append(name)
    return built


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (section `download`)")
    parser.add_argument("--source", action="append", dest="sources",
                        help="fetch only this source (repeatable; default: download.sources)")
    parser.add_argument("--list", action="store_true", help="list the known sources and exit")


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name in BUILTIN:
            print(f"{name:28s} built-in, offline (scikit-image sample images)")
        for s in REGISTRY.values():
            print(f"{s.name:28s} {s.layout:12s} {s.size_hint:>9s}  {s.homepage}")
        return 0
    from pipeline.runguard import run_stoppable

    def body() -> int:
        try:
            run_download(args.params, args.sources)
        except (DownloadError, ParamsError, DataError) as err:
            print(f"stm download: error: {err}", file=sys.stderr)
            return 1
        return 0

    # Stopped: the source being built goes with its temp folder (build_into's finally); the
    # archive in download.cache stays, so the next run resumes the transfer.
    return run_stoppable("stm download", body, lambda: partial_builds(args.params))


def partial_builds(params_file: str | Path) -> list[Path]:
    """This process's half-built sources: `.<name>.partial-<pid>` beside each target."""
    try:
        p, _ = read_params(load_params(params_file), None)
    except (ParamsError, DataError):
        return []
    target_root = _local_path(p.root, workspace_root(params_file))
    return list(target_root.glob(f".*.partial-{os.getpid()}"))
