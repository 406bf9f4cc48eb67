"""Trained models in MLflow: each stage's model is logged to its run and registered as a version of
one registered model per kind (STM, STRMN); `model.json` beside `model.pt` names that version, so
evaluation can link its runs to it."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from pipeline import tracking
from stm_core.data.io import atomic_write_bytes

log = logging.getLogger("pipeline.train")
MODEL_INFO = "model.json"
REGISTERED = {"stm": "STM", "strmn": "STRMN"}  # one registered model per kind


def registered_name(kind: str) -> str:
    return REGISTERED[kind]


def pip_requirements() -> list[str]:
    """Given explicitly: MLflow's inference of them loads the model in a subprocess (slow)."""
    import torch
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}",
            "numpy", "pillow", "scikit-image"]


def log_and_register(uri: str, run_id: str, network, s, checkpoints: str) -> dict:
    """Log `network` as an MLflow PyTorch model in run `run_id`, register it, write `model.json`."""
    import mlflow
    import mlflow.pytorch

    import stm_core

    name = registered_name(s.kind)
    sha = hashlib.sha256(s.model_out.read_bytes()).hexdigest()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            network.eval(), name="model", registered_model_name=name, pip_requirements=pip_requirements(),
            code_paths=[str(Path(stm_core.__file__).parent)], await_registration_for=120,
            serialization_format="pickle",  # pt2 must trace an input example; code_paths ships stm_core
            tags={"stage": s.stage, "model_sha256": sha})
    version = str(info.registered_model_version)
    client = tracking.client(uri)
    for key, value in {"stage": s.stage, "model_sha256": sha, "checkpoints": checkpoints}.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_tag(run_id, "registered_model", f"{name}/{version}")
    record = {"registered_model": name, "version": version, "model_uri": f"models:/{name}/{version}",
              "run_id": run_id, "model_id": getattr(info, "model_id", None), "stage": s.stage, "kind": s.kind,
              "sha256": sha, "checkpoints": checkpoints, "tracking_uri": uri}
    atomic_write_bytes(s.model_out.parent / MODEL_INFO, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    log.info("[train] MLflow model %s version %s (run %s)", name, version, run_id)
    return record
