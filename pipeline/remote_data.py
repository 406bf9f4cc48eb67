"""Video and image sets read from the store file by file: the same `VideoSequence` and image-pair
objects as stm_core's readers, built from one listing of the URI; each file is fetched when it is
read (`pipeline.storage.StoreFile`), never the whole set onto a node."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import cast

from pipeline import storage
from stm_core.data.io import DataError
from stm_core.data.video import FRAME_SUFFIXES, VideoSequence, natural_key


def _folders(files: list[str], prefix: str) -> dict[str, list[str]]:
    """Files directly inside each sub-folder of `prefix` (relative paths): folder -> file names."""
    out: dict[str, list[str]] = defaultdict(list)
    for f in files:
        if f.startswith(prefix):
            parts = f[len(prefix):].split("/")
            if len(parts) == 2 and not parts[1].startswith("."):
                out[parts[0]].append(parts[1])
    return out


def _sequence(uri: str, frames_dir: str, masks_dir: str, name: str, frames: list[str], masks: list[str],
              cache_mb: float) -> VideoSequence:
    files = sorted((storage.StoreFile(storage.join(uri, frames_dir, f), cache_mb) for f in frames
                    if f[f.rfind("."):].lower() in FRAME_SUFFIXES), key=natural_key)
    if not files:
        raise DataError(f"{storage.join(uri, frames_dir)}: no frames ({', '.join(FRAME_SUFFIXES)}) in this folder")
    by_stem = {p.stem: i for i, p in enumerate(files)}
    annotations = {}
    for m in sorted((storage.StoreFile(storage.join(uri, masks_dir, f), cache_mb) for f in masks if f.endswith(".png")),
                    key=natural_key):
        if m.stem not in by_stem:
            raise DataError(f"{m.uri}: annotation has no frame {m.stem}.* in {storage.join(uri, frames_dir)}")
        annotations[by_stem[m.stem]] = m
    # a StoreFile stands in for the Path the readers take (name, stem, suffix, parent, os.fspath)
    return VideoSequence(name, cast(list[Path], files), cast(dict[int, Path], annotations))


def read_davis_at(uri: str, split: str | None, cache_mb: float = 0.0, year: str = "2017",
                  resolution: str = "480p") -> list[VideoSequence]:
    """stm_core.data.video.read_davis for a DAVIS layout at a URI."""
    files = storage.list_files(uri)
    frames = _folders(files, f"JPEGImages/{resolution}/")
    masks = _folders(files, f"Annotations/{resolution}/")
    if not frames:
        raise DataError(f"{uri}: not a DAVIS layout (JPEGImages/{resolution} missing)")
    names_file = f"ImageSets/{year}/{split}.txt"
    if split is not None and names_file in files:
        names = [line.strip() for line in storage.read_bytes(storage.join(uri, names_file)).decode().splitlines()
                 if line.strip()]
    elif split is not None and any(f.startswith("ImageSets/") for f in files):
        raise DataError(f"{storage.join(uri, names_file)}: split file not found")
    else:
        names = sorted(frames)
    videos = []
    for name in names:
        if name not in frames:
            raise DataError(f"{storage.join(uri, 'JPEGImages', resolution, name)}: sequence {name!r} listed but "
                            "its frame folder is missing")
        videos.append(_sequence(uri, f"JPEGImages/{resolution}/{name}", f"Annotations/{resolution}/{name}", name,
                                frames[name], masks.get(name, []), cache_mb))
    return videos


def read_youtube_vos_at(uri: str, split: str = "train", cache_mb: float = 0.0) -> list[VideoSequence]:
    """stm_core.data.video.read_youtube_vos for a YouTube-VOS layout at a URI."""
    base = storage.join(uri, split)
    meta_uri = storage.join(base, "meta.json")
    try:
        meta = json.loads(storage.read_bytes(meta_uri))["videos"]
    except FileNotFoundError as err:
        raise DataError(f"{meta_uri}: YouTube-VOS meta.json not found") from err
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{meta_uri}: not a YouTube-VOS meta.json ({err})") from err
    files = storage.list_files(base)
    frames, masks = _folders(files, "JPEGImages/"), _folders(files, "Annotations/")
    videos = []
    for vid in sorted(meta):
        seq = _sequence(base, f"JPEGImages/{vid}", f"Annotations/{vid}", vid, frames.get(vid, []), masks.get(vid, []),
                        cache_mb)
        by_stem = {p.stem: i for i, p in enumerate(seq.frames)}
        first: dict[int, int] = {}
        for obj, info in meta[vid].get("objects", {}).items():
            stems = [s for s in info.get("frames", []) if s in by_stem]
            if not stems:
                raise DataError(f"{meta_uri}: video {vid} object {obj}: none of its frames exist")
            first[int(obj)] = min(by_stem[s] for s in stems)
        seq.object_frames = first
        videos.append(seq)
    return videos


class StorePairs:
    """stm_core.data.images.StaticImageSet for image sets at URIs (`<root>/images`, `<root>/masks`):
    the same pairs in the same order, each image read from the store when a clip needs it."""

    def __init__(self, roots: list[str], cache_mb: float = 0.0):
        from stm_core.data.images import ImageMaskPair

        self.pairs = []
        for root in roots:
            files = storage.list_files(root)
            images = {f[len("images/"):].rsplit(".", 1)[0]: f for f in files if f.startswith("images/")
                      and "/" not in f[len("images/"):] and f[f.rfind("."):].lower() in FRAME_SUFFIXES}
            masks = {f[len("masks/"):-4]: f for f in files if f.startswith("masks/") and f.endswith(".png")
                     and "/" not in f[len("masks/"):]}
            orphans = sorted(set(masks) - set(images))
            if orphans:
                raise DataError(f"{storage.join(root, masks[orphans[0]])}: mask has no image {orphans[0]}.*")
            missing = sorted(set(images) - set(masks))
            if missing:
                raise DataError(f"{storage.join(root, images[missing[0]])}: image has no mask {missing[0]}.png")
            if not images:
                raise DataError(f"{root}: no image + mask pairs (images/ + masks/)")
            for stem in sorted(images, key=lambda s: natural_key(storage.StoreFile(s))):
                image = storage.StoreFile(storage.join(root, images[stem]), cache_mb)
                mask = storage.StoreFile(storage.join(root, masks[stem]), cache_mb)
                self.pairs.append(ImageMaskPair(cast(Path, image), cast(Path, mask)))  # stand-ins, as above

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        return self.pairs[index].load()
