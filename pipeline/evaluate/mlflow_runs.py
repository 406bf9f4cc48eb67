"""The MLflow side of `stm evaluate`: one child run per variant (params, metrics, per-sequence table,
overlays, inputs) under the stage's parent run, and the parent's summary metrics and artifacts."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline import storage, tracking
from pipeline.evaluate import outputs
from pipeline.evaluate.inputs import checkpoint_training_data, model_info, resolve_device
from pipeline.evaluate.per_rule import model_key
from pipeline.evaluate.settings import EvaluateParams
from pipeline.evaluate.variants import MemoryParams, Variant
from pipeline.evaluate.worker import sha256


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
    data_name, digest = dataset_name(p), dataset_digest(p)
    for v, s in zip(variants, summaries):
        key = model_key(v, p.strmn_model)
        used = {key: models[key]} if key in models else {}
        child_tags = {**tags, "mlflow.parentRunId": parent_id, "stm_role": "variant", "stm_variant": v.name,
                      "stm_model": v.model, "stm_policy": v.policy, **model_tags(used)}
        run_id = tracking.create_run(uri, experiment, v.name, variant_params(v, p, memory, models, len(s.results)),
                                     child_tags)
        values = outputs.metrics_json([s])[v.name]
        # Against the logged model it ran (MLflow 3): the model's page lists these scores per dataset.
        model_id = next((info.get("model_id") for info in (model_info(path) for path, _ in used.values())), None)
        client.log_batch(run_id, metrics=[Metric(k, float(x), now, 0, model_id=model_id or None,
                                                 dataset_name=data_name if model_id else None,
                                                 dataset_digest=digest if model_id else None)
                                          for k, x in values.items() if x is not None])
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
        link_inputs(uri, run_id, p, used)
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


def dataset_name(p: EvaluateParams) -> str:
    """`<benchmark folder>/<split>`: the name of the evaluation's dataset input."""
    return f"{Path(p.dataset.rstrip('/')).name}/{p.split}"


def link_inputs(uri: str, run_id: str, p: EvaluateParams, models: dict[str, tuple[str, bytes]]) -> None:
    """MLflow inputs of an evaluation run: the benchmark it read (name, split, digest, source) and
    the logged models it ran (MLflow shows the run under each model)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput

    ids = [info["model_id"] for info in (model_info(path) for path, _ in models.values()) if info.get("model_id")]
    name = dataset_name(p)
    source = p.dataset if storage.is_uri(p.dataset) else Path(p.dataset).resolve().as_uri()
    data = Dataset(name=name, digest=dataset_digest(p), source_type="uri" if storage.is_uri(p.dataset) else "local",
                   source=source)
    tracking.client(uri).log_inputs(run_id, datasets=[DatasetInput(data, tags=[InputTag("mlflow.data.context",
                                                                                         "evaluation")])],
                                    models=[LoggedModelInput(model_id=i) for i in ids] or None)


def log_parent(uri: str, parent_id: str, summaries, written: list[Path], probe_files: Sequence[Path] = ()) -> None:
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

            for memory, values in json.loads(path.read_text())["memories"].items():
                name = memory.replace(":", "_")  # MLflow metric names take no ':'
                client.log_batch(parent_id, metrics=[Metric(f"read_probe.{name}.{k}", float(v), now, 0)
                                                     for k, v in values.items() if v is not None])


