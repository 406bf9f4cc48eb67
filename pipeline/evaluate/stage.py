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
import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from pipeline import storage, tracking
from pipeline.cluster import ClusterError
from pipeline.evaluate import outputs
from pipeline.evaluate.inputs import (
    checkpoint_files,
    checkpoint_training_data,
    item_cost,
    load_sequences,
    model_info,
    object_count,
    payload,
    resolve_device,
)
from pipeline.evaluate.mlflow_runs import link_inputs, log_children, log_parent, model_tags
from pipeline.evaluate.per_rule import model_key
from pipeline.evaluate.probe import write_probe
from pipeline.evaluate.records import ItemRecords, item_digest, record_result, records_dir, result_record
from pipeline.evaluate.settings import EvaluateParams
from pipeline.evaluate.variants import MemoryParams, Variant, parse_variants
from pipeline.evaluate.worker import EvaluationJob, EvaluationWorker, SequenceResult, sha256
from pipeline.params import ParamsError, load_params, section
from pipeline.workpool import Item, PoolError, PoolSpec, run_pool
from stm_core.data.io import DataError, write_json_atomic
from stm_core.data.video import VideoSequence
from stm_core.model.checkpoint import CheckpointError
from stm_core.scoring.masks import MetricError

__all__ = ["EvaluateParams", "EvaluationError", "evaluate", "add_arguments", "run"]


class EvaluationError(RuntimeError):
    pass


def pool_spec(p: EvaluateParams, device: str, ray_p: dict) -> PoolSpec:
    """Actors: one per GPU on cuda (each item timed alone), else per `evaluate.num_cpus` CPUs; how
    many from `ray.eval_actors` (null: as many as the cluster holds when the stage starts, at least
    one); a cluster without a node that fits one yet is waited for (`ray.wait_for_nodes_s`)."""
    gpus = (p.num_gpus if p.num_gpus is not None else 1.0) if device.startswith("cuda") else 0.0
    # max_restarts/max_task_retries: an actor lost with its node is replaced and its item retried once.
    return PoolSpec(num_cpus=p.num_cpus, num_gpus=gpus, actors=ray_p.get("eval_actors"), method="work",
                    wait_s=float(ray_p.get("wait_for_nodes_s", 600)), say_every_s=15.0,
                    can_grow=bool(os.environ.get("RAY_ADDRESS")),  # a cluster (or a job on one) may add nodes
                    options={"max_restarts": 1, "max_task_retries": 1})


def item_settings(p: EvaluateParams, memory: MemoryParams, device: str) -> dict:
    """What a result depends on besides its variant, checkpoint and sequence (a record's digest)."""
    return {"dataset": p.dataset, "format": p.format, "split": p.split, "year": p.year, "resolution": p.resolution,
            "device": device, "max_size": p.max_size, "precision": p.precision, "reproducible": p.reproducible,
            "top_k": memory.top_k, "every": memory.every}


def run_items(variants: list[Variant], videos: list[VideoSequence], models: dict[str, tuple[str, bytes]],
              p: EvaluateParams, memory: MemoryParams, ray_p: dict, writer: outputs.ResultsWriter,
              records: ItemRecords, keep_masks: set[str], probes: Sequence[VideoSequence] = (),
              ) -> tuple[dict[str, dict[str, SequenceResult]], list[dict[str, int]], list[dict]]:
    """Every (variant, sequence) item, and the read probes of `probes` with the STM model, on a pool of
    evaluation actors; items with a record from an earlier run are read back, not run again.
    -> (results by variant and sequence, each actor's checkpoint loads, the probe results).
    Raises EvaluationError naming the items that failed (every finished one stays recorded)."""
    import ray
    from tqdm import tqdm

    device = resolve_device(p.device)
    settings = item_settings(p, memory, device)
    model_refs = {kind: (sha256(data), [ray.put(data)]) for kind, (_, data) in models.items()}
    objects = {seq.name: object_count(seq) for seq in videos}
    results: dict[str, dict[str, SequenceResult]] = {v.name: {} for v in variants}
    probed: list[dict] = []
    digests: dict[str, str] = {}
    items: list[Item] = []

    def job(v: Variant | None, seq: VideoSequence):
        model = model_refs["stm"] if v is None else model_refs.get(model_key(v, p.strmn_model))
        return lambda: EvaluationJob(v, model, payload(seq), memory.every)

    for seq in videos:
        for v in variants:
            key = f"{v.name}/{seq.name}"
            model = model_refs.get(model_key(v, p.strmn_model))
            digests[key] = item_digest(variant=asdict(v), model=model[0] if model else "", sequence=seq.name,
                                       frames=len(seq), **settings)
            items.append(Item(key, item_cost(v, seq, objects[seq.name]), load=job(v, seq)))
    for seq in probes:
        key = f"read probe/{seq.name}"
        digests[key] = item_digest(probe=model_refs["stm"][0], sequence=seq.name, frames=len(seq), **settings)
        items.append(Item(key, 0.0, load=job(None, seq)))  # last: the report's extra, not a result

    def take(key: str, value) -> None:
        kind, _, seq_name = key.partition("/")
        if kind == "read probe":
            probed.append(value)
            return
        writer.add(value)
        if seq_name not in keep_masks:
            value.masks = []  # on disk now; keep memory flat on long benchmarks
        results[kind][seq_name] = value

    todo = []
    for item in items:
        digest = digests[item.key]
        if not records.has(digest):
            todo.append(item)
            continue
        meta, blobs = records.load(digest)
        if item.key.startswith("read probe/"):
            take(item.key, {**meta, "picture": blobs.get("picture.png")})
        else:
            take(item.key, record_result(meta, blobs))
    if len(todo) < len(items):
        print(f"evaluate: {len(items) - len(todo)} of {len(items)} items finished in an earlier run "
              f"({records.root}); evaluating the other {len(todo)}", file=sys.stderr)

    failed: list[str] = []
    loads: list[dict[str, int]] = []
    with tqdm(total=len(items), initial=len(items) - len(todo), desc="evaluate", unit="item", file=sys.stderr) as bar:
        def done(outcome) -> None:
            bar.update()
            if outcome.error:
                failed.append(f"{outcome.key}: {outcome.error}")
                print(f"evaluate: {outcome.key} failed: {outcome.error}", file=sys.stderr)
                return
            value = outcome.value
            if outcome.key.startswith("read probe/"):
                png = value.get("picture")
                records.save(digests[outcome.key], {k: v for k, v in value.items() if k != "picture"},
                             {"picture.png": png} if png else {})
            else:
                records.save(digests[outcome.key], *result_record(value))
            bar.set_postfix_str(outcome.key, refresh=False)
            take(outcome.key, value)

        if todo:
            spec = pool_spec(p, device, ray_p)
            threads = max(1, round(p.num_cpus))
            args = (device, p.max_size, memory.top_k, threads, p.reproducible, p.precision)
            run_pool(EvaluationWorker, args, todo, spec, on_done=done,
                     at_end=lambda actors: loads.extend(ray.get([a.loads.remote() for a in actors])))
    if failed:
        shown = "; ".join(failed[:5]) + (f"; ... and {len(failed) - 5} more" if len(failed) > 5 else "")
        raise EvaluationError(f"{len(failed)} of {len(items)} items failed ({shown}); the "
                              f"{records.count()} finished ones are kept in {records.root}/ and a re-run "
                              "evaluates only the rest")
    return results, loads, probed


def evaluate(params_path: str | Path, results_dir: Path, metrics_path: Path, plots_dir: Path) -> dict:
    params = load_params(params_path)
    p = section(params, "evaluate", EvaluateParams)
    memory = section(params, "memory", MemoryParams)
    mlflow_p = section(params, "mlflow", tracking.MlflowParams)
    variants = parse_variants(p.variants, memory)
    models = checkpoint_files(p, variants)
    videos = load_sequences(p, section(params, "storage", storage.StorageParams).cache_mb)

    import ray

    from pipeline.cluster import init_ray, resolve_tracking_uri

    started_ray = not ray.is_initialized()
    ray_p = params.get("ray") or {}  # placement: the pool's size and the local instance's (results do not depend on it)
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
    records = ItemRecords(records_dir(results_dir, storage.storage_root(params), root))
    status = "FAILED"
    monitor = ExitStack()  # this node's CPU, memory (and GPU) use as the parent's system/ metrics
    monitor.enter_context(tracking.system_metrics(uri, parent_id))
    try:
        link_inputs(uri, parent_id, p, models)
        first = videos[0].name
        probes = ([v for v in videos if len(v.annotations) >= 2][: p.probe_sequences] if "stm" in models else [])
        by_variant, loads, probed = run_items(variants, videos, models, p, memory, ray_p, writer, records,
                                              keep_masks={first}, probes=probes)
        summaries = [outputs.summarize_variant(v.name, [by_variant[v.name][s.name] for s in videos]) for v in variants]
        for s in summaries:
            writer.commit(s)
        written = outputs.write_dvc_outputs(summaries, metrics_path, plots_dir)
        overlay_frames = [f.read_bytes() for f in videos[0].frames]
        children = log_children(uri, mlflow_p.experiment, parent_id, tags, summaries, variants, p, memory, models,
                                overlay_frames, first)
        probe_files = write_probe(results_dir, probed, memory.every, str(models["stm"][0]) if probed else "")
        log_parent(uri, parent_id, summaries, written, probe_files)
        info = {"parent_run_id": parent_id, "experiment": mlflow_p.experiment, "tracking_uri": uri,
                "models": {k: model_info(path) for k, (path, _) in models.items()},
                "nodes": sorted({r.node_id for runs in by_variant.values() for r in runs.values() if r.node_id}),
                "children": children, "dataset": p.dataset, "split": p.split,
                "training_data": {kind: checkpoint_training_data(data) for kind, (_, data) in models.items()},
                "sequences": [v.name for v in videos], "variants": [asdict(v) for v in variants],
                "checkpoint_loads": loads}  # per actor: sha256 -> loads (1 each: models load once per worker)
        write_json_atomic(results_dir / "evaluation.json", info)
        records.clear()  # everything is in results/ now
        status = "FINISHED"
        return {"parent_run_id": parent_id, "metrics": outputs.metrics_json(summaries)}  # all METRICS
    except KeyboardInterrupt:  # SIGINT / SIGTERM (runguard.Stopped; Ray re-raises it plain): stopped, not failed
        status = "KILLED"
        raise
    finally:
        writer.close()
        monitor.close()
        tracking.finish_run(uri, parent_id, status)
        if started_ray:
            ray.shutdown()


def _fmt(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (sections evaluate, memory, mlflow)")
    parser.add_argument("--results", type=Path, default=Path("results"), help="folder for predicted masks")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/evaluate.json"), help="DVC metrics file")
    parser.add_argument("--plots", type=Path, default=Path("plots"), help="folder for the DVC plot data")


def run(args: argparse.Namespace) -> int:
    """Stopped by SIGINT / SIGTERM: the run ends KILLED, results/.partial goes, and the finished items
    (results.partial/) stay, so the same command goes on from them."""
    from pipeline.runguard import run_stoppable

    return run_stoppable("stm evaluate", lambda: _run(args), lambda: [args.results / ".partial"])


def _run(args: argparse.Namespace) -> int:
    try:
        out = evaluate(args.params, args.results, args.metrics, args.plots)
    except (ParamsError, CheckpointError, DataError, MetricError, EvaluationError, PoolError, ValueError,
            ClusterError) as err:
        print(f"stm evaluate: error: {err}", file=sys.stderr)
        return 2
    width = max(len(n) for n in out["metrics"])
    print(f"{'variant':<{width}}  {'J&F':>7}  {'J':>7}  {'F':>7}  {'ms/frame':>9}  {'entries':>7}")
    for name, m in out["metrics"].items():
        cells = [_fmt(m[k], 7, 4) for k in ("JF_mean", "J_mean", "F_mean")]
        print(f"{name:<{width}}  {'  '.join(cells)}  {_fmt(m['ms_per_frame'], 9, 2)}  {_fmt(m['memory_entries'], 7, 0)}")
    print(f"MLflow parent run {out['parent_run_id']}; metrics in {args.metrics}")
    return 0

