"""Trained models in MLflow: each stage's model is logged to its run and registered as a version of
one registered model per trained variant (`STM`, `STRMN`, `STRMN-<RULE>` for each STRMN rule's
fine-tuning); `model.json` beside `model.pt` names that version, so evaluation can link its runs to it.

Every version carries the tags `VERSION_TAGS`; the newest version of a stage has the alias
`latest-<stage>` (`latest-pretrain`, `latest-main`), and `stm report` gives `champion` to the version
with the best J&F (pipeline/report/champion.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline import tracking
from stm_core.data.io import atomic_write_bytes

log = logging.getLogger("pipeline.train")
MODEL_INFO = "model.json"
REGISTERED = {"stm": "STM", "strmn": "STRMN"}  # the kinds' names; an STRMN rule's fine-tuning adds -<RULE>
VERSION_TAGS = ("stage", "rule", "git_commit", "params_digest", "model_sha256", "checkpoints")


def registered_name(kind: str, rule: str | None = None) -> str:
    """`STM`, `STRMN` (the shared pretraining), `STRMN-C` (the rule-C fine-tuning): one registered
    model per trained variant, so each rule's versions and champion are its own."""
    return f"{REGISTERED[kind]}-{rule}" if rule else REGISTERED[kind]


def params_digest(params: dict) -> str:
    """sha256 (first 16 hex digits) of the run's params as canonical JSON: equal params, equal digest."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pip_requirements() -> list[str]:
    """Given explicitly: MLflow's inference of them loads the model in a subprocess (slow)."""
    import torch
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}",
            "numpy", "pillow", "scikit-image"]


def latest_alias(stage: str) -> str:
    """The alias of a stage's newest registered version: `latest-pretrain`, `latest-main`."""
    return f"latest-{stage}"


def input_example():
    """A tiny clip for the logged model's signature and example: 2 frames of 16 x 16, one object."""
    import numpy as np

    frames = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:10, 4:10] = 1
    return {"frames": frames, "mask": mask}


def version_tags(s, sha: str, checkpoints: str, params: dict) -> dict[str, str]:
    """The tags of a registered version (`VERSION_TAGS`): what made it, and where its checkpoints are."""
    tags = {"stage": s.stage, "rule": s.rule or "", "git_commit": tracking.git_commit(s.root),
            "params_digest": params_digest(params), "model_sha256": sha, "checkpoints": checkpoints}
    assert tuple(tags) == VERSION_TAGS
    return tags


@contextmanager
def temp_dir_beside(path: Path) -> Iterator[None]:
    """tempfile's folder a fresh one beside `path` while the block runs (removed after it)."""
    folder = tempfile.mkdtemp(prefix=".stage-", dir=path.parent)
    before, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield
    finally:
        tempfile.tempdir = before
        shutil.rmtree(folder, ignore_errors=True)


def log_and_register(uri: str, run_id: str, network, s, checkpoints: str, params: dict | None = None) -> dict:
    """Log the checkpoint `s.model_out` as a models-from-code pyfunc (pipeline/mlflow_model.py, no
    pickle) in run `run_id`, register it, alias the version `latest-<stage>`, write `model.json`.
    `s`: TrainSettings (kind, stage, rule, root, model_out); `params`: the run's params."""
    import mlflow
    import mlflow.pyfunc
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    import pipeline.mlflow_model as model_code
    import stm_core

    name = registered_name(s.kind, s.rule)
    sha = hashlib.sha256(s.model_out.read_bytes()).hexdigest()
    tags = version_tags(s, sha, checkpoints, params or {})
    example = input_example()
    u8 = np.dtype(np.uint8)  # any clip length and frame size: -1 on every free axis
    signature = ModelSignature(
        inputs=Schema([TensorSpec(u8, (-1, -1, -1, 3), "frames"), TensorSpec(u8, (-1, -1), "mask")]),
        outputs=Schema([TensorSpec(u8, (-1, -1, -1))]))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # MLflow stages the model in a temp folder: beside the checkpoint, on the disk that holds it
    # already, not in TMPDIR (a cluster node's small local disk).
    with mlflow.start_run(run_id=run_id), temp_dir_beside(s.model_out):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=model_code.__file__, artifacts={"checkpoint": str(s.model_out)},
            registered_model_name=name, pip_requirements=pip_requirements() + [f"mlflow=={mlflow.__version__}"],
            code_paths=[str(Path(stm_core.__file__).parent)], await_registration_for=120,
            signature=signature, input_example=example, tags={"stage": s.stage, "rule": tags["rule"], "model_sha256": sha})
    version = str(info.registered_model_version)
    client = tracking.client(uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_tag(run_id, "registered_model", f"{name}/{version}")
    # MLflow reserves the alias `latest` (`models:/STM/latest` is already the newest version): one per stage.
    client.set_registered_model_alias(name, latest_alias(s.stage), version)
    record = {"registered_model": name, "version": version, "model_uri": f"models:/{name}/{version}",
              "alias_uri": f"models:/{name}@{latest_alias(s.stage)}",
              "run_id": run_id, "model_id": getattr(info, "model_id", None), "stage": s.stage, "kind": s.kind, "rule": s.rule or "",
              "sha256": sha, "checkpoints": checkpoints, "tracking_uri": uri}
    atomic_write_bytes(s.model_out.parent / MODEL_INFO, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    log.info("[train] MLflow model %s version %s (run %s)", name, version, run_id)
    return record
