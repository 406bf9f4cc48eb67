"""The MLflow runs around a training stage: the parent run of the STRMN per-rule fine-tunings, and
the dataset a stage trained on (an MLflow dataset input: name, digest, source).

DVC runs `train_strmn@A`, `@B`, ... as separate processes; each finds (or creates) one parent run
`train-strmn-main` keyed by a digest of what the fine-tunings share (their params less the rule,
and the pretrained weights they start from), and starts its own run under it. The parent's status
follows its latest fine-tuning (RUNNING while one trains, then how that one ended)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline import storage, tracking
from pipeline.train.shards import MANIFEST

PARENT_TAG = "stm_rule_group"  # the parent's key: the digest of what its fine-tunings share


def rule_group(params: dict, init: Path | None) -> str:
    """The fine-tunings' shared digest: the run's params with `strmn.rule` removed, and the init weights."""
    shared = {**params, "strmn": {k: v for k, v in (params.get("strmn") or {}).items() if k != "rule"}}
    shared["init"] = storage.fingerprint(init) if init else None
    return hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rule_parent(uri: str, experiment: str, group: str, tags: dict[str, str]) -> str:
    """The id of the parent run of the per-rule fine-tunings with this `group` digest (made once)."""
    c = tracking.client(uri)
    exp_id = tracking.get_or_create_experiment(uri, experiment)
    found = c.search_runs([exp_id], filter_string=f"tags.{PARENT_TAG} = '{group}'", max_results=1,
                          order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    return tracking.create_run(uri, experiment, "train-strmn-main", {"strmn_rule_group": group},
                               {**tags, PARENT_TAG: group, "stm_role": "rule-fine-tunings"})


def set_parent_status(uri: str, parent_id: str | None, status: str) -> None:
    """RUNNING while a fine-tuning trains, then how it ended (FINISHED, KILLED, FAILED)."""
    if not parent_id:
        return
    if status == "RUNNING":
        tracking.reattach_run(uri, parent_id)
    else:
        tracking.finish_run(uri, parent_id, status)


def dataset_of(location: str, fingerprint: str) -> tuple[str, str, str]:
    """-> (name, digest, source) of a training set. The digest is the shard manifest's SHA-256 where
    the clips are store objects listed in `_manifest.json`, else `fingerprint` (names and sizes)."""
    manifest = storage.join(location, MANIFEST) if storage.is_uri(location) else str(Path(location) / MANIFEST)
    try:
        raw = storage.read_bytes(manifest) if storage.is_uri(manifest) else Path(manifest).read_bytes()
        digest = hashlib.sha256(raw).hexdigest()[:32]
    except (FileNotFoundError, OSError):
        digest = fingerprint[:32]
    source = location if storage.is_uri(location) else Path(location).resolve().as_uri()
    parts = Path(location.rstrip("/")).parts if not storage.is_uri(location) else location.rstrip("/").split("/")
    return "/".join(parts[-2:]), digest, source


def log_dataset(uri: str, run_id: str, location: str, fingerprint: str) -> None:
    """The training set as the run's dataset input (context `training`): the run's page and
    `mlflow.search_runs` show what it trained on."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    name, digest, source = dataset_of(location, fingerprint)
    data = Dataset(name=name, digest=digest, source_type="uri" if storage.is_uri(location) else "local", source=source)
    tracking.client(uri).log_inputs(run_id, datasets=[DatasetInput(data, tags=[InputTag("mlflow.data.context",
                                                                                         "training")])])
