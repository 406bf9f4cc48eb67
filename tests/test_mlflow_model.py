"""A checkpoint logged and registered the way training does it loads back from the registry by alias
and segments exactly like InferenceCore on the same checkpoint; no pickle in the logged model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from tests.test_segment_many import tiny_checkpoint
from tests.test_train import write_params


def test_registered_model_segments_like_inference_core(tmp_path: Path, monkeypatch) -> None:
    import mlflow
    import mlflow.pyfunc

    from pipeline import tracking
    from pipeline.train import registry
    from pipeline.train import settings as train_cmd
    from stm_core.inference import InferenceCore, probabilities_to_mask
    from stm_core.model.checkpoint import load_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / ".git").mkdir()
    (tmp_path / "data/raw/builtin-videos").mkdir(parents=True)
    s = train_cmd.settings(write_params(tmp_path), "main", "stm")  # what `stm train --stage main` (dvc `train`) has
    ckpt = tiny_checkpoint(s.model_out)
    run_id = tracking.create_run(uri, "test", "train-main", {"x": 1}, {})
    start = time.monotonic()
    record = registry.log_and_register(uri, run_id, None, s, "ckpts", {"x": 1})
    took = time.monotonic() - start
    print(f"log_and_register: {took:.1f} s")
    assert took < 30, f"logging took {took:.1f} s"
    assert (ckpt.parent / registry.MODEL_INFO).is_file()

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = tracking.client(uri)
    assert str(client.get_model_version_by_alias("STM", "latest-main").version) == record["version"]
    version = client.get_model_version("STM", record["version"])
    assert {k: version.tags[k] for k in ("stage", "rule", "params_digest")} == {
        "stage": "main", "rule": "", "params_digest": registry.params_digest({"x": 1})}
    model = mlflow.pyfunc.load_model("models:/STM@latest-main")
    meta = model.metadata
    assert meta.signature is not None and meta.saved_input_example_info is not None
    local = Path(mlflow.artifacts.download_artifacts(f"models:/STM/{record['version']}", dst_path=str(tmp_path / "dl")))
    names = {p.name for p in local.rglob("*")}
    assert "python_model.pkl" not in names and not any(n.endswith((".pkl", ".pickle")) for n in names), names

    rng = np.random.default_rng(0)
    frames = (rng.random((4, 64, 64, 3)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:40, 20:44] = 1
    got = model.predict({"frames": frames, "mask": mask})

    core = InferenceCore(load_checkpoint(ckpt).eval())
    want = []
    with torch.inference_mode():
        for t, f in enumerate(frames):
            probs = core.step(torch.from_numpy(f).permute(2, 0, 1), torch.from_numpy(mask.astype(np.int64)) if t == 0 else None)
            want.append(probabilities_to_mask(probs, core.object_ids).numpy())
    core.close()
    assert got.shape == (4, 64, 64)
    np.testing.assert_array_equal(got, np.stack(want))


def test_client_reads_the_registry_of_its_own_store(tmp_path: Path) -> None:
    """A client for store B reads B's registered models even after this process pointed the global
    registry at store A (as registering a model does)."""
    import mlflow

    from pipeline import tracking

    a, b = (f"sqlite:///{tmp_path / name}.db" for name in ("a", "b"))
    tracking.client(b).create_registered_model("OnlyInB")
    previous = mlflow.get_registry_uri()
    mlflow.set_registry_uri(a)
    try:
        names = [m.name for m in tracking.client(b).search_registered_models()]
    finally:
        mlflow.set_registry_uri(previous)
    assert names == ["OnlyInB"]
