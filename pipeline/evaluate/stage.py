"""Evaluate the memory variants on a benchmark in parallel on Ray; log them to MLflow and DVC outputs.

`stm evaluate [--params params.yaml]`. The variants (`evaluate.variants`) are STM memory policies
with the STM model, STRMN update rules with K = `memory.slots` slots with the STRMN model, and the
`copy-first` baseline. Each (variant, sequence) pair is one Ray task (local, or the cluster at
$RAY_ADDRESS); frames, annotations and checkpoints travel to the tasks through the object store.

Writes results/<variant>/<sequence>/%05d.png (palette PNGs) and results/<variant>/sequences.csv,
metrics/evaluate.json ({variant: {JF_mean, J_mean, ..., fps, peak_memory_mb, memory_entries}}),
plots/evaluate_variants.csv, plots/evaluate_j_per_frame.csv, results/evaluation.json (the MLflow
parent run id, for `stm report`), and one MLflow parent run with one child run per variant.
"""

from __future__ import annotations

import argparse
import functools
import io
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline import tracking
from pipeline.evaluate import outputs
from pipeline.evaluate.per_rule import checkpoint_path, model_key
from pipeline.evaluate.variants import MemoryParams, Variant, parse_variants
from pipeline.evaluate.worker import SequencePayload, SequenceResult, remote_sequence, sha256
from pipeline.params import ParamsError, load_params, section
from stm_core.data.io import DataError
from stm_core.data.video import VideoSequence, read_davis, read_youtube_vos
from stm_core.metrics import MetricError, write_json_atomic
from stm_core.model.checkpoint import CheckpointError

DEFAULT_VARIANTS = ["copy-first", "stm:first", "stm:previous", "stm:first+previous", "stm:every", "stm:fifo", "strmn"]
TRAIN_HINT = {"stm": "stm train --stage main", "strmn": "stm train --stage main --model strmn"}


@dataclass
class EvaluateParams:
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))  # see pipeline/evaluate/variants.py
    dataset: str = "data/raw/builtin-videos"  # benchmark root: DAVIS or YouTube-VOS layout
    format: str = "auto"  # davis | youtube-vos | auto (DAVIS if JPEGImages/ exists)
    split: str = "val"  # DAVIS ImageSets/<year>/<split>.txt, or the YouTube-VOS split folder
    year: str = "2017"  # DAVIS ImageSets year
    resolution: str = "480p"  # DAVIS resolution folder
    sequences: list[str] = field(default_factory=list)  # only these sequences (empty: the whole split)
    max_sequences: int = 0  # the first N sequences only (0: all)
    stm_model: str = "models/main/model.pt"  # checkpoint for stm:* variants
    strmn_model: str = "models/strmn-main/model.pt"  # checkpoint for strmn* variants
    device: str = "cpu"  # cpu | cuda | auto
    max_size: int | None = None  # longest side the network sees (null: native resolution)
    num_cpus: float = 1.0  # CPUs per task (torch threads = max(1, round(num_cpus)))
    num_gpus: float | None = None  # GPUs per task; null: 0.25 with cuda (4 tasks share a GPU), 0 on cpu
    overlays: int = 3  # overlay images per variant logged to MLflow (from the first sequence)

    def __post_init__(self):
        if self.format not in ("auto", "davis", "youtube-vos"):
            raise ValueError(f"format must be auto, davis or youtube-vos, got {self.format!r}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus must be > 0, got {self.num_cpus}")


class EvaluationError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- inputs

def load_sequences(p: EvaluateParams) -> list[VideoSequence]:
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
        if p.sequences:
            by_name = {v.name: v for v in videos}
            missing = [s for s in p.sequences if s not in by_name]
            if missing:
                raise DataError(f"{root / p.split}: sequence(s) {missing} not found")
            videos = [by_name[s] for s in p.sequences]
    if p.max_sequences > 0:
        videos = videos[: p.max_sequences]
    if not videos:
        raise DataError(f"{root}: no sequences in split {p.split!r}")
    return videos


def payload(seq: VideoSequence) -> SequencePayload:
    if not seq.annotations:
        raise DataError(f"{seq.frames[0].parent}: sequence {seq.name} has no annotations to start from or score")
    return SequencePayload(name=seq.name, frame_names=[f.stem for f in seq.frames],
                           frames=[f.read_bytes() for f in seq.frames],
                           annotations={t: path.read_bytes() for t, path in seq.annotations.items()},
                           object_frames=seq.object_frames)


@functools.lru_cache(maxsize=4)  # one load per checkpoint, not one per variant
def checkpoint_training_data(data: bytes) -> str:
    """The `training_data` a checkpoint records (import-official, stm train), or ""."""
    import torch

    found = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True).get("training_data", "")
    return str(found)[:400]  # MLflow params are bounded


def checkpoint_files(p: EvaluateParams, variants: list[Variant]) -> dict[str, tuple[Path, bytes]]:
    """model key (stm, strmn, strmn@RULE) -> (path, bytes) for the variants; a missing file is an error naming it."""
    import torch

    out = {}
    for key in sorted({model_key(v, p.strmn_model) for v in variants if v.model != "none"}):
        kind, _, rule = key.partition("@")
        users = ", ".join(v.name for v in variants if model_key(v, p.strmn_model) == key)
        path = checkpoint_path(key, p.stm_model, p.strmn_model)
        if not path.is_file():
            hint = TRAIN_HINT[kind] + (f" --rule {rule}" if rule else "")
            raise CheckpointError(f"{path}: checkpoint not found (evaluate.{kind}_model, needed by {users}); "
                                  f"train it with `{hint}` or drop those variants from evaluate.variants")
        data = path.read_bytes()
        try:
            found = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True).get("kind")
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


# ----------------------------------------------------------------------------- Ray

def run_tasks(variants: list[Variant], videos: list[VideoSequence], models: dict[str, tuple[Path, bytes]],
              p: EvaluateParams, memory: MemoryParams, writer: outputs.ResultsWriter,
              keep_masks: set[str]) -> dict[str, dict[str, SequenceResult]]:
    """One task per (variant, sequence), all submitted at once; results written as they arrive."""
    import ray
    from tqdm import tqdm

    device = resolve_device(p.device)
    gpus = p.num_gpus if p.num_gpus is not None else (0.25 if device.startswith("cuda") else 0.0)
    task = ray.remote(remote_sequence).options(num_cpus=p.num_cpus, num_gpus=gpus, max_retries=1)
    model_refs = {kind: (sha256(data), [ray.put(data)]) for kind, (_, data) in models.items()}
    pending: dict = {}
    for seq in videos:
        ref = ray.put(payload(seq))
        for v in variants:
            args = (v, model_refs.get(model_key(v, p.strmn_model)), ref, device, p.max_size, memory.top_k, max(1, round(p.num_cpus)))
            pending[task.remote(*args)] = (v.name, seq.name)
    results: dict[str, dict[str, SequenceResult]] = {v.name: {} for v in variants}
    with tqdm(total=len(pending), desc="evaluate", unit="task", file=sys.stderr) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                name, seq = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - RayTaskError wraps the worker's exception
                    for other in pending:
                        ray.cancel(other)
                    cause = getattr(err, "cause", None) or err
                    raise EvaluationError(f"variant {name} on sequence {seq}: {type(cause).__name__}: {cause}") from err
                writer.add(result)
                if seq not in keep_masks:
                    result.masks = []  # on disk now; keep memory flat on long benchmarks
                results[name][seq] = result
                bar.set_postfix_str(f"{name}/{seq}", refresh=False)
                bar.update()
    return results


# ----------------------------------------------------------------------------- MLflow

def variant_params(v: Variant, p: EvaluateParams, memory: MemoryParams, models, n_seq: int) -> dict:
    path, data = models.get(model_key(v, p.strmn_model), (None, b""))
    return {"variant": v.name, "model": v.model, "policy": v.policy, "family": v.family,
            "rule": v.rule or "", "memory_size": v.size if v.size is not None else "", "postprocess": v.postprocess,
            "checkpoint": str(path) if path else "", "checkpoint_sha256": sha256(data)[:16] if path else "",
            "training_data": checkpoint_training_data(data) if path else "",
            "top_k": memory.top_k, "device": resolve_device(p.device), "max_size": p.max_size,
            "dataset": p.dataset, "split": p.split, "sequences": n_seq}


def log_children(uri: str, experiment: str, parent_id: str, tags: dict, summaries, variants, p, memory,
                 models, overlay_frames: list[bytes], first_seq: str) -> dict[str, str]:
    from mlflow.entities import Metric

    client = tracking.client(uri)
    now = int(time.time() * 1000)
    ids = {}
    for v, s in zip(variants, summaries):
        child_tags = {**tags, "mlflow.parentRunId": parent_id, "stm_role": "variant", "stm_variant": v.name,
                      "stm_model": v.model, "stm_policy": v.policy}
        run_id = tracking.create_run(uri, experiment, v.name, variant_params(v, p, memory, models, len(s.results)),
                                     child_tags)
        values = outputs.metrics_json([s])[v.name]
        client.log_batch(run_id, metrics=[Metric(k, float(x), now, 0) for k, x in values.items() if x is not None])
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "sequences.csv").write_bytes(outputs.sequence_table(s))
            client.log_artifact(run_id, str(Path(tmp) / "sequences.csv"))
            seq = next((r for r in s.results if r.name == first_seq), None)
            if seq is not None and seq.masks:
                folder = Path(tmp) / "overlays"
                folder.mkdir()
                for name, png in outputs.overlay_images(seq, overlay_frames, p.overlays).items():
                    (folder / name).write_bytes(png)
                client.log_artifacts(run_id, str(folder), "overlays")
        tracking.finish_run(uri, run_id)
        ids[v.name] = run_id
    return ids


# ----------------------------------------------------------------------------- the stage

def evaluate(params_path: str | Path, results_dir: Path, metrics_path: Path, plots_dir: Path) -> dict:
    params = load_params(params_path)
    p = section(params, "evaluate", EvaluateParams)
    memory = section(params, "memory", MemoryParams)
    mlflow_p = section(params, "mlflow", tracking.MlflowParams)
    variants = parse_variants(p.variants, memory)
    models = checkpoint_files(p, variants)
    videos = load_sequences(p)

    root = tracking.project_root(params_path)
    uri = tracking.tracking_uri(root, mlflow_p.tracking_uri)
    tags = tracking.standard_tags(root, "evaluate")
    run_params = {"evaluate": asdict(p), "memory": asdict(memory), "variant_names": [v.name for v in variants],
                  "n_sequences": len(videos)}
    parent_id = tracking.create_run(uri, mlflow_p.experiment, "evaluate", run_params, {**tags, "stm_role": "evaluation"})
    print(f"evaluate: {len(variants)} variants x {len(videos)} sequences on {p.dataset} ({p.split}); "
          f"MLflow run {parent_id} at {uri}", file=sys.stderr)

    import ray

    from pipeline.cluster import init_ray

    started_ray = not ray.is_initialized()
    writer = outputs.ResultsWriter(results_dir)
    status = "FAILED"
    try:
        ray_p = params.get("ray") or {}  # the local instance's size (section owned by train); results do not depend on it
        store_mb = ray_p.get("object_store_mb")
        init_ray(num_cpus=ray_p.get("num_cpus"), object_store_memory=store_mb * 2**20 if store_mb else None)
        first = videos[0].name
        by_variant = run_tasks(variants, videos, models, p, memory, writer, keep_masks={first})
        summaries = [outputs.summarize_variant(v.name, [by_variant[v.name][s.name] for s in videos]) for v in variants]
        for s in summaries:
            writer.commit(s)
        written = outputs.write_dvc_outputs(summaries, metrics_path, plots_dir)
        overlay_frames = [f.read_bytes() for f in videos[0].frames]
        children = log_children(uri, mlflow_p.experiment, parent_id, tags, summaries, variants, p, memory, models,
                                overlay_frames, first)
        _log_parent(uri, parent_id, summaries, written)
        info = {"parent_run_id": parent_id, "experiment": mlflow_p.experiment, "tracking_uri": uri,
                "children": children, "dataset": p.dataset, "split": p.split,
                "sequences": [v.name for v in videos], "variants": [asdict(v) for v in variants]}
        write_json_atomic(results_dir / "evaluation.json", info)
        status = "FINISHED"
        return {"parent_run_id": parent_id, "metrics": outputs.metrics_json(summaries)}  # all METRICS
    finally:
        writer.close()
        tracking.finish_run(uri, parent_id, status)
        if started_ray:
            ray.shutdown()


def _log_parent(uri: str, parent_id: str, summaries, written: list[Path]) -> None:
    from mlflow.entities import Metric

    client = tracking.client(uri)
    now = int(time.time() * 1000)
    metrics = []
    for s in summaries:
        for key in ("JF_mean", "J_mean", "F_mean", "ms_per_frame", "memory_entries"):
            value = outputs.metrics_json([s])[s.name][key]
            if value is not None:
                metrics.append(Metric(f"{s.name}.{key}", value, now, 0))
    for i in range(0, len(metrics), 500):
        client.log_batch(parent_id, metrics=metrics[i:i + 500])
    for path in written:
        client.log_artifact(parent_id, str(path), "dvc")


def _fmt(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (sections evaluate, memory, mlflow)")
    parser.add_argument("--results", type=Path, default=Path("results"), help="folder for predicted masks")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/evaluate.json"), help="DVC metrics file")
    parser.add_argument("--plots", type=Path, default=Path("plots"), help="folder for the DVC plot data")


def run(args: argparse.Namespace) -> int:
    try:
        out = evaluate(args.params, args.results, args.metrics, args.plots)
    except (ParamsError, CheckpointError, DataError, MetricError, EvaluationError, ValueError) as err:
        print(f"stm evaluate: error: {err}", file=sys.stderr)
        return 2
    width = max(len(n) for n in out["metrics"])
    print(f"{'variant':<{width}}  {'J&F':>7}  {'J':>7}  {'F':>7}  {'ms/frame':>9}  {'entries':>7}")
    for name, m in out["metrics"].items():
        cells = [_fmt(m[k], 7, 4) for k in ("JF_mean", "J_mean", "F_mean")]
        print(f"{name:<{width}}  {'  '.join(cells)}  {_fmt(m['ms_per_frame'], 9, 2)}  {_fmt(m['memory_entries'], 7, 0)}")
    print(f"MLflow parent run {out['parent_run_id']}; metrics in {args.metrics}")
    return 0

