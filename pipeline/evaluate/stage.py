"""Evaluate the memory variants on a benchmark in parallel on Ray; log them to MLflow and DVC outputs.

`stm evaluate [--params params.yaml]`. The variants (`evaluate.variants`) are STM memory policies
with the STM model, STRMN update rules with K = `memory.slots` slots with the STRMN model, the
`copy-first` baseline, and `oracle:<policy>` diagnostics (the policy's memory frames hold their ground
truth; grammar in pipeline/evaluate/variants.py). A pool of Ray actors (local, or the cluster at $RAY_ADDRESS; one per GPU, or
per `evaluate.num_cpus` CPUs) takes the (variant, sequence) items one at a time: each actor loads a
checkpoint once, and times each sequence with its device to itself. Frames, annotations and
checkpoints travel to the actors through the object store.

Writes results/<variant>/<sequence>/%05d.png (palette PNGs) and results/<variant>/sequences.csv,
metrics/evaluate.json ({variant: {JF_mean, J_mean, ..., fps, peak_memory_mb, memory_entries}}),
plots/evaluate_variants.csv, plots/evaluate_j_per_frame.csv, results/evaluation.json (the MLflow
parent run id, for `stm report`), and one MLflow parent run with one child run per variant. With an
STM model, the actors also probe its memory read on the first `evaluate.probe_sequences` sequences
(stm_core.read_probe): results/read_probe.json and read_probe.png, metrics `read_probe.*` on the parent.
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

from pipeline import storage, tracking
from pipeline.cluster import ClusterError
from pipeline.evaluate import outputs
from pipeline.evaluate.per_rule import checkpoint_path, model_key
from pipeline.evaluate.probe import write_probe
from pipeline.evaluate.variants import MemoryParams, Variant, parse_variants
from pipeline.evaluate.worker import EvaluationWorker, SequencePayload, SequenceResult, sha256
from pipeline.params import ParamsError, load_params, section
from pipeline.train.registry import MODEL_INFO
from stm_core.data.io import DataError, write_json_atomic
from stm_core.data.video import VideoSequence, read_davis, read_youtube_vos
from stm_core.model.checkpoint import CheckpointError
from stm_core.precision import check_precision
from stm_core.scoring.masks import MetricError

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
    num_gpus: float | None = None  # GPUs per evaluation actor; null: 1 on cuda (timed alone), 0 on cpu
    overlays: int = 3  # overlay images per variant logged to MLflow (from the first sequence)
    reproducible: bool = True  # CPU: the same convolution kernels every run (no timed Winograd choice)
    precision: str = "fp32"  # fp32: exact, TF32 off (the official STM's numbers) | bf16: bf16 autocast, faster
    probe_sequences: int = 3  # sequences on which the STM model's memory read is checked against the ground truth (0: off)

    def __post_init__(self):
        if self.format not in ("auto", "davis", "youtube-vos"):
            raise ValueError(f"format must be auto, davis or youtube-vos, got {self.format!r}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.probe_sequences < 0:
            raise ValueError(f"probe_sequences must be >= 0, got {self.probe_sequences}")
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus must be > 0, got {self.num_cpus}")
        check_precision(self.precision)


class EvaluationError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- inputs

def load_sequences(p: EvaluateParams) -> list[VideoSequence]:
    root = storage.local_or_cached(p.dataset)  # a URI: the driver's cached copy
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
    import json

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


# ----------------------------------------------------------------------------- Ray

def actor_count(p: EvaluateParams, device: str, items: int) -> tuple[int, float]:
    """(actors, GPUs per actor): as many actors as the cluster's CPUs (or GPUs) hold, at most one per item."""
    import ray

    total = ray.cluster_resources()
    if device.startswith("cuda"):
        gpus = p.num_gpus if p.num_gpus is not None else 1.0
        fit = int(total.get("GPU", 0) // gpus) if gpus > 0 else items
    else:
        gpus = 0.0
        fit = int(total.get("CPU", 1) // p.num_cpus) if p.num_cpus > 0 else items
    if fit < 1:
        raise EvaluationError(f"the Ray cluster has {total.get('GPU' if gpus else 'CPU', 0)} "
                              f"{'GPUs' if gpus else 'CPUs'}; an evaluation actor needs "
                              f"{gpus if gpus else p.num_cpus} (evaluate.num_gpus / evaluate.num_cpus)")
    return max(1, min(fit, items)), gpus


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


def heaviest_first(work: list[tuple[Variant, VideoSequence]]) -> list[tuple[Variant, VideoSequence]]:
    """Longest items first (LPT scheduling): the pool does not end waiting on one long item while the
    other actors idle. Cost ~ frames x objects x the variant's per-frame cost; ties keep their order."""
    objects = {seq.name: object_count(seq) for _, seq in work}
    return sorted(work, key=lambda item: -len(item[1]) * objects[item[1].name] * _VARIANT_COST.get(item[0].family, 1.0))


def run_tasks(variants: list[Variant], videos: list[VideoSequence], models: dict[str, tuple[Path, bytes]],
              p: EvaluateParams, memory: MemoryParams, writer: outputs.ResultsWriter, keep_masks: set[str],
              probes: list[VideoSequence] = (),
              ) -> tuple[dict[str, dict[str, SequenceResult]], list[dict[str, int]], list[dict]]:
    """A pool of evaluation actors, each fed one (variant, sequence) item at a time as it frees up;
    results written as they arrive. Then the read probes of `probes` with the STM model (variant None).
    Returns the results, each actor's checkpoint loads and the probe results."""
    import ray
    from tqdm import tqdm

    device = resolve_device(p.device)
    work = heaviest_first([(v, seq) for seq in videos for v in variants]) + [(None, seq) for seq in probes]
    n_actors, gpus = actor_count(p, device, len(work))
    # SPREAD: the actors fill every node, not the driver's first.
    actor_cls = ray.remote(EvaluationWorker).options(num_cpus=p.num_cpus, num_gpus=gpus, max_restarts=1,
                                                      max_task_retries=1, scheduling_strategy="SPREAD")
    threads = max(1, round(p.num_cpus))
    actors = [actor_cls.remote(device, p.max_size, memory.top_k, threads, p.reproducible, p.precision)
              for _ in range(n_actors)]
    model_refs = {kind: (sha256(data), [ray.put(data)]) for kind, (_, data) in models.items()}
    payload_refs: dict[str, object] = {}
    idle = list(actors)
    pending: dict = {}
    results: dict[str, dict[str, SequenceResult]] = {v.name: {} for v in variants}
    probed: list[dict] = []
    queue = iter(work)
    try:
        with tqdm(total=len(work), desc=f"evaluate ({n_actors} actors)", unit="item", file=sys.stderr) as bar:
            while True:
                while idle and (item := next(queue, None)) is not None:
                    v, seq = item
                    if seq.name not in payload_refs:
                        payload_refs[seq.name] = ray.put(payload(seq))
                    actor = idle.pop()
                    if v is None:
                        ref = actor.probe.remote(model_refs["stm"], payload_refs[seq.name], memory.every)
                    else:
                        ref = actor.run.remote(v, model_refs.get(model_key(v, p.strmn_model)), payload_refs[seq.name])
                    pending[ref] = (v, seq.name, actor)
                if not pending:
                    break
                [ref], _ = ray.wait(list(pending), num_returns=1)
                v, seq_name, actor = pending.pop(ref)
                name = v.name if v else "read probe"
                try:
                    result = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - RayTaskError wraps the worker's exception
                    cause = getattr(err, "cause", None) or err
                    raise EvaluationError(f"variant {name} on sequence {seq_name}: {type(cause).__name__}: "
                                          f"{cause}") from err
                idle.append(actor)
                bar.set_postfix_str(f"{name}/{seq_name}", refresh=False)
                bar.update()
                if v is None:
                    probed.append(result)
                    continue
                writer.add(result)
                if seq_name not in keep_masks:
                    result.masks = []  # on disk now; keep memory flat on long benchmarks
                results[name][seq_name] = result
        loads = ray.get([a.loads.remote() for a in actors])
    finally:
        for a in actors:
            ray.kill(a)
    return results, loads, probed


# ----------------------------------------------------------------------------- MLflow

def variant_params(v: Variant, p: EvaluateParams, memory: MemoryParams, models, n_seq: int) -> dict:
    path, data = models.get(model_key(v, p.strmn_model), (None, b""))
    info = model_info(path) if path else {}
    return {"registered_model": info.get("model_uri", ""), "train_run_id": info.get("run_id", ""),
            "variant": v.name, "model": v.model, "policy": v.policy, "family": v.family,
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
                      "stm_model": v.model, "stm_policy": v.policy, **model_tags({v.model: models[v.model]}
                                                                                  if v.model in models else {})}
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
        link_inputs(uri, run_id, p, {v.model: models[v.model]} if v.model in models else {})
        tracking.finish_run(uri, run_id)
        ids[v.name] = run_id
    return ids


def model_tags(models: dict[str, tuple[str, bytes]]) -> dict[str, str]:
    """Tags that name the registered model version (and training run) each kind came from."""
    tags = {}
    for kind, (path, data) in models.items():
        info = model_info(path)
        tags[f"stm_{kind}_checkpoint"] = str(path)
        tags[f"stm_{kind}_sha256"] = sha256(data)[:16]
        if info:
            tags[f"stm_{kind}_model_version"] = info["model_uri"]
            tags[f"stm_{kind}_train_run_id"] = info["run_id"]
    versions = [t for k, t in tags.items() if k.endswith("_model_version")]
    if versions:
        tags["model_versions"] = ", ".join(versions)
    return tags


def dataset_digest(p: EvaluateParams) -> str:
    """The dataset's DVC hash when DVC tracks it (dvc.lock), else a hash of its file names and sizes."""
    import yaml

    lock = tracking.workspace_root() / "dvc.lock"
    if lock.is_file() and not storage.is_uri(p.dataset):
        try:
            stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        except yaml.YAMLError:
            stages = {}
        want = Path(p.dataset).as_posix().rstrip("/")
        for stage in stages.values():
            for out in stage.get("outs", []) or []:
                if out.get("path", "").rstrip("/") == want and out.get("md5"):
                    return str(out["md5"])
    if storage.is_uri(p.dataset):
        return sha256("\n".join(storage.list_files(p.dataset)).encode())[:32]
    return storage.fingerprint(Path(p.dataset))[:32]


def link_inputs(uri: str, run_id: str, p: EvaluateParams, models: dict[str, tuple[str, bytes]]) -> None:
    """MLflow inputs of an evaluation run: the benchmark it read (name, split, digest, source) and
    the logged models it ran (MLflow shows the run under each model)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput

    ids = [info["model_id"] for info in (model_info(path) for path, _ in models.values()) if info.get("model_id")]
    name = f"{Path(p.dataset.rstrip('/')).name}/{p.split}"
    source = p.dataset if storage.is_uri(p.dataset) else Path(p.dataset).resolve().as_uri()
    data = Dataset(name=name, digest=dataset_digest(p), source_type="uri" if storage.is_uri(p.dataset) else "local",
                   source=source)
    tracking.client(uri).log_inputs(run_id, datasets=[DatasetInput(data, tags=[InputTag("mlflow.data.context",
                                                                                         "evaluation")])],
                                    models=[LoggedModelInput(model_id=i) for i in ids] or None)


# ----------------------------------------------------------------------------- the stage

def evaluate(params_path: str | Path, results_dir: Path, metrics_path: Path, plots_dir: Path) -> dict:
    params = load_params(params_path)
    p = section(params, "evaluate", EvaluateParams)
    memory = section(params, "memory", MemoryParams)
    mlflow_p = section(params, "mlflow", tracking.MlflowParams)
    variants = parse_variants(p.variants, memory)
    models = checkpoint_files(p, variants)
    videos = load_sequences(p)

    import ray

    from pipeline.cluster import init_ray, resolve_tracking_uri

    started_ray = not ray.is_initialized()
    ray_p = params.get("ray") or {}  # the local instance's size (section owned by train); results do not depend on it
    store_mb = ray_p.get("object_store_mb")
    init_ray(num_cpus=ray_p.get("num_cpus"), object_store_memory=store_mb * 2**20 if store_mb else None)
    root = tracking.project_root(params_path)
    try:  # inputs travel to the tasks through the object store: local paths are fine on a cluster
        uri = resolve_tracking_uri(tracking.tracking_uri(root, mlflow_p.tracking_uri))
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    tags = {**tracking.standard_tags(root, "evaluate"), **model_tags(models)}
    run_params = {"evaluate": asdict(p), "memory": asdict(memory), "variant_names": [v.name for v in variants],
                  "n_sequences": len(videos)}
    parent_id = tracking.create_run(uri, mlflow_p.experiment, "evaluate", run_params, {**tags, "stm_role": "evaluation"})
    print(f"evaluate: {len(variants)} variants x {len(videos)} sequences on {p.dataset} ({p.split}); "
          f"MLflow run {parent_id} at {uri}", file=sys.stderr)

    writer = outputs.ResultsWriter(results_dir)
    status = "FAILED"
    try:
        link_inputs(uri, parent_id, p, models)
        first = videos[0].name
        probes = ([v for v in videos if len(v.annotations) >= 2][: p.probe_sequences] if "stm" in models else [])
        by_variant, loads, probed = run_tasks(variants, videos, models, p, memory, writer, keep_masks={first},
                                              probes=probes)
        summaries = [outputs.summarize_variant(v.name, [by_variant[v.name][s.name] for s in videos]) for v in variants]
        for s in summaries:
            writer.commit(s)
        written = outputs.write_dvc_outputs(summaries, metrics_path, plots_dir)
        overlay_frames = [f.read_bytes() for f in videos[0].frames]
        children = log_children(uri, mlflow_p.experiment, parent_id, tags, summaries, variants, p, memory, models,
                                overlay_frames, first)
        probe_files = write_probe(results_dir, probed, memory.every, str(models["stm"][0]) if probed else "")
        _log_parent(uri, parent_id, summaries, written, probe_files)
        info = {"parent_run_id": parent_id, "experiment": mlflow_p.experiment, "tracking_uri": uri,
                "models": {k: model_info(path) for k, (path, _) in models.items()},
                "nodes": sorted({r.node_id for runs in by_variant.values() for r in runs.values() if r.node_id}),
                "children": children, "dataset": p.dataset, "split": p.split,
                "training_data": {kind: checkpoint_training_data(data) for kind, (_, data) in models.items()},
                "sequences": [v.name for v in videos], "variants": [asdict(v) for v in variants],
                "checkpoint_loads": loads}  # per actor: sha256 -> loads (1 each: models load once per worker)
        write_json_atomic(results_dir / "evaluation.json", info)
        status = "FINISHED"
        return {"parent_run_id": parent_id, "metrics": outputs.metrics_json(summaries)}  # all METRICS
    finally:
        writer.close()
        tracking.finish_run(uri, parent_id, status)
        if started_ray:
            ray.shutdown()


def _log_parent(uri: str, parent_id: str, summaries, written: list[Path], probe_files: list[Path] = ()) -> None:
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
    for path in probe_files:
        client.log_artifact(parent_id, str(path), "read_probe")
        if path.suffix == ".json":
            import json

            for memory, values in json.loads(path.read_text())["memories"].items():
                name = memory.replace(":", "_")  # MLflow metric names take no ':'
                client.log_batch(parent_id, metrics=[Metric(f"read_probe.{name}.{k}", float(v), now, 0)
                                                     for k, v in values.items() if v is not None])


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
    except (ParamsError, CheckpointError, DataError, MetricError, EvaluationError, ValueError, ClusterError) as err:
        print(f"stm evaluate: error: {err}", file=sys.stderr)
        return 2
    width = max(len(n) for n in out["metrics"])
    print(f"{'variant':<{width}}  {'J&F':>7}  {'J':>7}  {'F':>7}  {'ms/frame':>9}  {'entries':>7}")
    for name, m in out["metrics"].items():
        cells = [_fmt(m[k], 7, 4) for k in ("JF_mean", "J_mean", "F_mean")]
        print(f"{name:<{width}}  {'  '.join(cells)}  {_fmt(m['ms_per_frame'], 9, 2)}  {_fmt(m['memory_entries'], 7, 0)}")
    print(f"MLflow parent run {out['parent_run_id']}; metrics in {args.metrics}")
    return 0

