"""What `stm evaluate` reads: the benchmark's sequences, their payloads for the workers, the checkpoints."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

from pipeline import storage
from pipeline.evaluate.per_rule import checkpoint_path, model_key
from pipeline.evaluate.settings import EvaluateParams
from pipeline.evaluate.variants import Variant
from pipeline.evaluate.worker import SequencePayload
from pipeline.train.registry import MODEL_INFO
from stm_core.data.io import DataError
from stm_core.data.video import VideoSequence, read_davis, read_youtube_vos
from stm_core.model.checkpoint import CheckpointError

TRAIN_HINT = {"stm": "stm train --stage main", "strmn": "stm train --stage main --model strmn"}


def load_sequences(p: EvaluateParams, cache_mb: float = 0.0) -> list[VideoSequence]:
    """The benchmark's sequences. At a URI they are indexed from one listing and each file is read
    from the store when its item is sent (`pipeline.remote_data`): no copy of the set on any node."""
    if storage.is_uri(p.dataset):
        return _pick(p, _sequences_at(p, cache_mb), p.dataset)
    root = Path(p.dataset)
    if not root.is_dir():
        raise DataError(f"{root}: benchmark dataset folder not found (evaluate.dataset; the built-in one "
                        "comes from `stm download` / `dvc repro download`)")
    fmt = p.format
    if fmt == "auto":
        fmt = "davis" if (root / "JPEGImages").is_dir() else "youtube-vos"
    if fmt == "davis":
        videos = read_davis(root, p.split, year=p.year, resolution=p.resolution, sequences=p.sequences or None)
    else:
        videos = read_youtube_vos(root, p.split)
    return _pick(p, videos, str(root))


def _sequences_at(p: EvaluateParams, cache_mb: float) -> list[VideoSequence]:
    from pipeline.remote_data import read_davis_at, read_youtube_vos_at

    fmt = p.format
    if fmt == "auto":
        fmt = "davis" if storage.list_files(storage.join(p.dataset, "JPEGImages")) else "youtube-vos"
    if fmt == "davis":  # a split file does not limit the names given in evaluate.sequences
        return read_davis_at(p.dataset, None if p.sequences else p.split, cache_mb, year=p.year,
                             resolution=p.resolution)
    return read_youtube_vos_at(p.dataset, p.split, cache_mb)


def _pick(p: EvaluateParams, videos: list[VideoSequence], where: str) -> list[VideoSequence]:
    """evaluate.sequences (in their order) and evaluate.max_sequences of `videos`."""
    if p.sequences:
        by_name = {v.name: v for v in videos}
        missing = [s for s in p.sequences if s not in by_name]
        if missing:
            raise DataError(f"{where}: sequence(s) {missing} not found")
        videos = [by_name[s] for s in p.sequences]
    if p.max_sequences > 0:
        videos = videos[: p.max_sequences]
    if not videos:
        raise DataError(f"{where}: no sequences in split {p.split!r}")
    return videos


def payload(seq: VideoSequence) -> SequencePayload:
    if not seq.annotations:
        raise DataError(f"{seq.frames[0].parent}: sequence {seq.name} has no annotations to start from or score")
    return SequencePayload(name=seq.name, frame_names=[f.stem for f in seq.frames],
                           frames=[f.read_bytes() for f in seq.frames],
                           annotations={t: path.read_bytes() for t, path in seq.annotations.items()},
                           object_frames=seq.object_frames)


@functools.lru_cache(maxsize=16)  # the driver deserialises each checkpoint once, not once per use
def checkpoint_header(data: bytes) -> dict:
    """-> {"kind", "training_data"} of a checkpoint's bytes; raises what torch.load raises."""
    import torch

    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return {"kind": payload.get("kind"), "training_data": str(payload.get("training_data", ""))[:400]}


def checkpoint_training_data(data: bytes) -> str:
    """The `training_data` a checkpoint records (import-official, stm train), or "" (bounded for MLflow)."""
    return checkpoint_header(data)["training_data"]


def read_checkpoint(path: str) -> bytes | None:
    if storage.is_uri(path):
        try:
            return storage.read_bytes(path)
        except FileNotFoundError:
            return None
    return Path(path).read_bytes() if Path(path).is_file() else None


def model_info(path: str) -> dict:
    """The `model.json` that `stm train` writes beside a model: its MLflow run and registered version."""

    sidecar = (storage.join(path.rsplit("/", 1)[0], MODEL_INFO) if storage.is_uri(path)
               else str(Path(path).parent / MODEL_INFO))
    data = read_checkpoint(sidecar)
    try:
        return json.loads(data) if data else {}
    except ValueError:
        return {}


def checkpoint_files(p: EvaluateParams, variants: list[Variant]) -> dict[str, tuple[str, bytes]]:
    """model key (stm, strmn, strmn@RULE) -> (path or URI, bytes) for the variants; a missing file is an
    error naming it."""
    out = {}
    for key in sorted({model_key(v, p.strmn_model) for v in variants if v.model != "none"}):
        kind, _, rule = key.partition("@")
        users = ", ".join(v.name for v in variants if model_key(v, p.strmn_model) == key)
        path = checkpoint_path(key, p.stm_model, p.strmn_model)
        data = read_checkpoint(path)
        if data is None:
            hint = TRAIN_HINT[kind] + (f" --rule {rule}" if rule else "")
            raise CheckpointError(f"{path}: checkpoint not found (evaluate.{kind}_model, needed by {users}); "
                                  f"train it with `{hint}` or drop those variants from evaluate.variants")
        try:
            found = checkpoint_header(data)["kind"]
        except Exception as err:  # noqa: BLE001 - pickle/zip errors have many types
            raise CheckpointError(f"{path}: not a readable checkpoint ({err})") from err
        if kind == "strmn" and found != "strmn":
            raise CheckpointError(f"{path}: a {found!r} checkpoint, but {users} need a STRMN model (kind 'strmn')")
        out[key] = (path, data)
    return out


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# Relative cost per frame and object: `first` runs the memory encoder once, the others every frame,
# STRMN adds its Fusion Cell. Only the order of the work depends on it.
_VARIANT_COST = {"copy-first": 0.0, "first": 0.5, "recurrent": 1.25, "recurrent-i2m": 1.25}


def object_count(seq: VideoSequence) -> int:
    """Objects of a sequence from its metadata or its first annotation (a cheap scheduling hint)."""
    if seq.object_frames:
        return len(seq.object_frames)
    if not seq.annotations:
        return 1
    import numpy as np
    from PIL import Image

    with Image.open(seq.annotations[seq.annotated[0]]) as im:
        return max(1, int(np.count_nonzero(np.unique(np.asarray(im)))))


def item_cost(variant: Variant, seq: VideoSequence, objects: int) -> float:
    """Relative work of one (variant, sequence) item: frames x objects x the variant's per-frame cost.
    The pool runs the costliest first (LPT), so it does not end on one long item while others idle."""
    return len(seq) * objects * _VARIANT_COST.get(variant.family, 1.0)
