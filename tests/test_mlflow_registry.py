"""The MLflow registry as docs/mlflow.md describes it: the champion goes to the best J&F version
(a real sqlite registry), and (slow) after real small runs of `stm train` (STM main, two STRMN rule
fine-tunings), `stm evaluate` and `stm report`, every model, alias and version tag the page names
exists, the champion's logged model lists the evaluation's J&F, the fine-tunings share one parent
run, and training and evaluation runs carry their dataset and system metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

DOC = Path(__file__).resolve().parents[1] / "docs" / "mlflow.md"


def evaluation_record(uri: str, name: str, version: str, dataset: str = "bench") -> dict:
    return {"tracking_uri": uri, "dataset": dataset, "split": "val", "parent_run_id": "p",
            "models": {"stm": {"registered_model": name, "version": version, "tracking_uri": uri}},
            "variants": [{"name": "stm-first", "model": "stm", "policy": "first"},
                         {"name": "stm-every-5", "model": "stm", "policy": "every:5"},
                         {"name": "stm-oracle-every-5", "model": "stm", "policy": "every:5", "oracle": True},
                         {"name": "copy-first", "model": "none", "policy": "copy-first"}]}


def variants_csv(first: float, every: float) -> str:
    return (f"variant,JF_mean\nstm-first,{first}\nstm-every-5,{every}\nstm-oracle-every-5,0.99\n"
            "copy-first,0.95\n")


def test_champion_is_the_best_version_on_the_same_benchmark(tmp_path):
    from pipeline import tracking
    from pipeline.report.champion import set_champions

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    client.create_registered_model("STM")
    for _ in range(3):
        client.create_model_version("STM", source=(tmp_path / "m").as_uri())
    assert set_champions(evaluation_record(uri, "STM", "1"), variants_csv(0.4, 0.5)) == {"STM": "1"}
    assert set_champions(evaluation_record(uri, "STM", "2"), variants_csv(0.6, 0.3)) == {"STM": "2"}
    # worse than version 2, and oracle and copy-first rows (0.99, 0.95) never count
    assert set_champions(evaluation_record(uri, "STM", "3"), variants_csv(0.2, 0.1)) == {"STM": "2"}
    assert str(client.get_model_version_by_alias("STM", "champion").version) == "2"
    tags = client.get_model_version("STM", "2").tags
    assert tags["JF_mean"] == "0.600000" and tags["JF_variant"] == "stm-first" and tags["JF_dataset"] == "bench/val"
    # another benchmark's scores are not compared with these
    assert set_champions(evaluation_record(uri, "STM", "3", dataset="other"), variants_csv(0.2, 0.1)) == {"STM": "3"}


def named_in_doc() -> tuple[set[str], set[str]]:
    """(model URIs `models:/NAME@ALIAS` in the code examples, version tags the page lists)."""
    text = DOC.read_text()
    uris = set(re.findall(r"models:/([A-Za-z0-9<>_-]+@[a-z-]+)", text))
    tag_text = text.split("Version tags:")[1].split("\n\n")[0]
    return uris, set(re.findall(r"`([A-Za-z0-9_]+)`", tag_text))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_registry_after_real_runs_is_what_the_page_names(tmp_path, monkeypatch):
    import mlflow
    import ray

    from pipeline import tracking
    from pipeline.cli import main
    from tests.test_train import make_project, write_params

    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    make_project(tmp_path)
    params = write_params(tmp_path, ray={"num_workers": 0}, train={"steps": 2, "checkpoint_every": 2,
                                                                    "log_images_every": 0, "init": "none"})
    full = yaml.safe_load(params.read_text())
    full["evaluate"] = {"variants": ["stm:first", "strmn"], "dataset": "data/raw/builtin-videos", "split": "val",
                        "stm_model": "models/main/model.pt", "strmn_model": "models/strmn-main/{rule}/model.pt",
                        "num_cpus": 1, "overlays": 0, "probe_sequences": 0}
    full["memory"] = {"slots": 3, "rules": ["A", "C"]}
    params.write_text(yaml.safe_dump(full))
    assert main(["train", "--stage", "main", "--params", str(params)]) == 0
    for rule in ("A", "C"):
        assert main(["train", "--stage", "main", "--model", "strmn", "--rule", rule, "--params", str(params)]) == 0
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["evaluate", "--params", str(params)]) == 0
    finally:
        ray.shutdown()
    assert main(["report"]) == 0

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    assert sorted(m.name for m in client.search_registered_models()) == ["STM", "STRMN-A", "STRMN-C"]
    uris, doc_tags = named_in_doc()
    for spec in uris:
        name, alias = spec.replace("<RULE>", "C").split("@")
        client.get_model_version_by_alias(name, alias)  # raises when the page names what does not exist
    evaluation = json.loads(Path("results/evaluation.json").read_text())
    scores = json.loads(Path("metrics/evaluate.json").read_text())
    best = {"STM": "stm-first", "STRMN-A": "strmn-recurrent-3-A", "STRMN-C": "strmn-recurrent-3-C"}
    for name, variant in best.items():
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.version == client.get_model_version_by_alias(name, "latest-main").version
        assert set(champion.tags) == doc_tags, (name, champion.tags)
        assert champion.tags["stage"] == "main" and champion.tags["rule"] == ("" if name == "STM" else name[-1])
        assert champion.tags["JF_variant"] == variant and len(champion.tags["params_digest"]) == 16
        # the version's source is its logged model (`models:/<model_id>`), which names the version back
        assert champion.source.startswith("models:/m-"), champion.source
        logged = client.get_logged_model(champion.model_id or champion.source[len("models:/"):])
        assert {"name": name, "version": champion.version} in json.loads(logged.tags["mlflow.modelVersions"])
        model_metrics = {m.key: m for m in logged.metrics}
        assert model_metrics["JF_mean"].value == pytest.approx(scores[variant]["JF_mean"], abs=1e-6)
        assert model_metrics["JF_mean"].dataset_name == "builtin-videos/val"
        assert model_metrics["JF_mean"].run_id == evaluation["children"][variant]

    mlflow.set_tracking_uri(uri)
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["test-train"], output_format="list")}
    parent = runs["train-strmn-main"]
    assert parent.info.status == "FINISHED"
    for rule in ("A", "C"):
        child = runs[f"train-strmn-main-{rule}"]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.data.tags["rule"] == rule
    for name in ("train-main", "train-strmn-main-A", "evaluate"):
        run = client.get_run(runs[name].info.run_id)
        assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), (name, sorted(run.data.metrics))
        (dataset,) = run.inputs.dataset_inputs
        assert dataset.dataset.digest and dataset.dataset.source.endswith("builtin-videos"), dataset
        context = {t.key: t.value for t in dataset.tags}["mlflow.data.context"]
        assert context == ("evaluation" if name == "evaluate" else "training")
