"""`stm train`: batches, the training step, params, and (slow) the real Ray Train runs: both stages on
2 CPU workers with an MLflow sqlite store, a worker killed mid-run, and a driver restart."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from training_configs import loop_config, plain_loss, stage_params, video_data

from pipeline.params import ParamsError
from pipeline.train import settings as train_cmd
from pipeline.train.data import collate, prepare
from pipeline.train.settings import StrmnParams
from pipeline.train.step import Unroll, lr_at
from stm_core.model.network import ModelConfig, STMNetwork

TINY_MODEL = {"backbone": "resnet18", "pretrained": "none", "norm": "frozen_bn", "decoder_dim": 16,
              "fusion_dim": 8}


def moving_square_clip(rng: np.random.Generator, n: int = 3, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A bright square moving over noise: frames N x H x W x 3 uint8, masks N x H x W uint8 (object 1)."""
    frames = rng.integers(0, 80, size=(n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    y, x = rng.integers(2, size // 2, size=2)
    for t in range(n):
        yy, xx = y + 2 * t, x + 2 * t
        frames[t, yy:yy + 10, xx:xx + 10] = (230, 60, 40)
        masks[t, yy:yy + 10, xx:xx + 10] = 1
    return frames, masks


# ----------------------------------------------------------------------------- fast
def test_collate_pads_objects_and_marks_valid():
    rng = np.random.default_rng(0)
    a = moving_square_clip(rng)
    b = (a[0], np.where(a[1] > 0, 2, 0).astype(np.uint8))  # a clip with ids 0, 2 -> relabelled to 1
    b = prepare(b, 0, 3, rng)
    c = (a[0], a[1] * 0)  # no object at all
    frames, masks, valid = collate([a, b, c])
    assert frames.shape == (3, 3, 3, 32, 32) and frames.dtype == torch.float32 and frames.max() <= 1
    assert masks.shape == (3, 3, 32, 32) and int(masks[1].max()) == 1
    assert valid.tolist() == [[True], [True], [False]]


def test_prepare_crops_one_window_and_keeps_frame0_objects():
    rng = np.random.default_rng(1)
    frames, masks = moving_square_clip(rng, n=3, size=48)
    masks[2, :4, :4] = 5  # an object that is not in frame 0: background in training
    f, m = prepare((frames, masks), 32, 3, rng)
    assert f.shape == (3, 32, 32, 3) and m.shape == (3, 32, 32)
    assert set(np.unique(m).tolist()) <= {0, 1} and m[0].any()


def test_lr_schedule():
    train = stage_params(lr=1e-3, warmup_steps=4, steps=20, lr_schedule="cosine")
    assert lr_at(0, train) == pytest.approx(2.5e-4)
    assert lr_at(3, train) == pytest.approx(1e-3)
    assert lr_at(19, train) < 2e-4 and lr_at(19, train) >= 1e-4 - 1e-12
    assert lr_at(10, dataclasses.replace(train, lr_schedule="constant")) == 1e-3


def test_loss_goes_down_in_process(one_thread):
    """The training step (Unroll module + Adam) fits a tiny moving-square data set."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    clips = [moving_square_clip(rng) for _ in range(4)]
    frames, masks, valid = collate(clips)
    model = Unroll(STMNetwork(ModelConfig(**TINY_MODEL)), plain_loss(), StrmnParams())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        out = model(frames, masks, valid)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert out.logits.shape == (4, 2, 2, 32, 32)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses


def test_strmn_unroll_module_trains(one_thread):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    frames, masks, valid = collate([moving_square_clip(rng, n=6) for _ in range(2)])
    net = STMNetwork(ModelConfig(**{**TINY_MODEL, "kind": "strmn", "norm": "group"}))
    model = Unroll(net, plain_loss(), StrmnParams(rule="C", slots=3, segment_length=3))
    out = model(frames, masks, valid)  # the 3 slots fill in segment 1; segment 2 fuses with gradient
    out.loss.backward()
    assert out.logits.shape[:2] == (2, 5)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.fusion.parameters())


def write_params(root: Path, **override) -> Path:
    params = {
        "seed": 0,
        "model": dict(TINY_MODEL),
        "strmn": {"slots": 3, "rule": "C", "norm": "group", "segment_length": 2, "pretrain_frames": 4, "main_frames": 4},
        "pretrain": {"steps": 4, "batch_size": 2, "lr": 1e-3, "crop": 32, "checkpoint_every": 2, "log_every": 1,
                     "log_images_every": 2, "data": "data/synthetic/{model}", "data_format": "parquet",
                     "init": "none", "max_skip": 0},
        "train": {"steps": 6, "batch_size": 2, "lr": 1e-3, "crop": 32, "max_skip": 2, "checkpoint_every": 2,
                  "log_every": 1, "log_images_every": 3, "data": "data/raw/builtin-videos", "data_format": "davis",
                  "init": "pretrain"},
        "ray": {"num_workers": 2, "cpus_per_worker": 1, "storage": "checkpoints"},
        "mlflow": {"experiment": "test-train"},
    }
    for key, value in override.items():
        params[key] = {**params.get(key, {}), **value} if isinstance(value, dict) else value
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_settings_errors_and_run_names(tmp_path):
    (tmp_path / ".git").mkdir()
    (tmp_path / "data/raw/builtin-videos").mkdir(parents=True)
    path = write_params(tmp_path)
    s = train_cmd.settings(path, "main", "stm")
    assert s.root == tmp_path.resolve() and s.model.kind == "stm" and s.stage_params.steps == 6
    assert s.model_out == tmp_path.resolve() / "models/main/model.pt"
    assert s.metrics_out == tmp_path.resolve() / "metrics/train-main.json"
    assert s.init_path() == tmp_path.resolve() / "models/pretrain/model.pt"
    r = train_cmd.settings(path, "main", "strmn")
    assert r.model.kind == "strmn" and r.model.norm == "group" and r.frames == 4
    assert r.model_out.parent.name == "strmn-main" and r.metrics_out.name == "train-main-strmn.json"
    assert r.init_path().parent.name == "strmn-pretrain"
    name = train_cmd.run_name(s, None)
    assert name.startswith("main-") and name == train_cmd.run_name(train_cmd.settings(path, "main", "stm"), None)
    write_params(tmp_path, train={"checkpoint_every": 3})  # bookkeeping: same run
    assert train_cmd.run_name(train_cmd.settings(path, "main", "stm"), None) == name
    write_params(tmp_path, train={"lr": 5e-4})  # a different training: a fresh run
    assert train_cmd.run_name(train_cmd.settings(path, "main", "stm"), None) != name
    write_params(tmp_path, train={"lrr": 5e-4})
    with pytest.raises(ParamsError, match="lrr"):
        train_cmd.settings(path, "main", "stm")
    write_params(tmp_path, model={"kind": "strmn"})
    with pytest.raises(ParamsError, match="--model"):
        train_cmd.settings(path, "main", "stm")


def test_queued_experiment_paths_stay_in_the_workspace(tmp_path, monkeypatch):
    """`dvc exp run --queue` runs in a temp copy with DVC_ROOT = the parent repo: outputs belong to
    the copy, the MLflow store to the parent."""
    parent, copy = tmp_path / "parent", tmp_path / "copy"
    for root in (parent, copy):
        (root / ".git").mkdir(parents=True)
    path = write_params(copy)
    monkeypatch.setenv("DVC_ROOT", str(parent))
    s = train_cmd.settings(path, "pretrain", "stm")
    assert s.root == copy.resolve() and s.tracking_root == parent.resolve()
    assert s.model_out.is_relative_to(copy.resolve()) and s.data_path().is_relative_to(copy.resolve())
    assert Path(s.storage()).is_relative_to(copy.resolve())


def test_tracking_uri_follows_dvc_root_and_env(tmp_path, monkeypatch):
    from pipeline.tracking import project_root, tracking_uri

    (tmp_path / "repo/.git").mkdir(parents=True)
    (tmp_path / "repo/sub").mkdir()
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert project_root(tmp_path / "repo/sub/params.yaml") == (tmp_path / "repo").resolve()
    assert tracking_uri(project_root(tmp_path / "repo/params.yaml")) == f"sqlite:///{(tmp_path / 'repo').resolve()}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "elsewhere"))
    assert project_root(tmp_path / "repo/params.yaml") == (tmp_path / "elsewhere").resolve()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking_uri(tmp_path) == "http://mlflow:5000"


# ----------------------------------------------------------------------------- slow: real Ray
def make_project(root: Path) -> None:
    """Tiny built-in videos and synthetic Parquet clips (the real writers, small settings)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stm_core.data.builtin import BuiltinImagesConfig, write_builtin_images
    from stm_core.data.builtin_videos import BuiltinVideosConfig, write_builtin_videos
    from stm_core.data.clips import encode_clip_row
    from stm_core.data.images import StaticImageSet
    from stm_core.data.synth import SynthConfig, synthesize_clips

    (root / ".git").mkdir(exist_ok=True)
    write_builtin_videos(root / "data/raw/builtin-videos",
                         BuiltinVideosConfig(height=48, width=48, frames=8, train_sequences=3, val_sequences=1), 0)
    write_builtin_images(root / "data/raw/builtin-images", BuiltinImagesConfig(count=6, size=48), 0)
    pairs = StaticImageSet(root / "data/raw/builtin-images")
    for kind, n_frames in (("stm", 3), ("strmn", 4)):
        clips = synthesize_clips(pairs, SynthConfig(n_frames=n_frames, height=40, width=40), 0, range(8))
        rows = [encode_clip_row(i, c) for i, c in enumerate(clips)]
        out = root / "data/synthetic" / kind
        out.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows[:4]), out / "clips-00000-0.parquet")
        pq.write_table(pa.Table.from_pylist(rows[4:]), out / "clips-00001-0.parquet")


@pytest.fixture()
def project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv(train_cmd.FAULT_ENV, raising=False)
    make_project(tmp_path)
    return tmp_path


def stm(*argv: str) -> int:
    from pipeline.cli import main

    return main(["train", *argv])


def runs(root: Path, experiment: str = "test-train"):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root.resolve()}/mlflow.db")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def training_summary(root: Path, run_id: str) -> dict:
    """The full summary the driver logs to MLflow (metrics/train-*.json keeps three numbers)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root.resolve()}/mlflow.db")
    path = client.download_artifacts(run_id, "training_summary.json", str(root))
    return json.loads(Path(path).read_text())


def curve_steps(csv_path: Path) -> list[int]:
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "step,loss", f"{csv_path}: header {lines[0]!r}"
    return [int(line.split(",")[0]) for line in lines[1:]]


def loss_steps(root: Path, run_id: str) -> list[int]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root.resolve()}/mlflow.db")
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


@pytest.mark.slow
def test_pretrain_streams_parquet_on_ray(project, ray_2cpu):
    """STM pretraining on 2 CPU workers from the synthetic Parquet clips (Ray Data): the DVC outputs
    and one finished MLflow run with the loss curve and prediction overlays."""
    from mlflow import MlflowClient

    from stm_core.model.checkpoint import load_checkpoint

    params = write_params(project)
    assert stm("--stage", "pretrain", "--params", str(params)) == 0
    metrics = json.loads((project / "metrics/train-pretrain.json").read_text())
    assert sorted(metrics) == ["clips_per_s", "final_loss", "steps"], "dvc exp show gets three numbers per stage"
    assert metrics["steps"] == 4 and np.isfinite(metrics["final_loss"]) and metrics["clips_per_s"] > 0
    assert curve_steps(project / "plots/train-pretrain.csv") == [1, 2, 3, 4]
    payload = torch.load(project / "models/pretrain/model.pt", weights_only=True)
    assert payload["kind"] == "stm" and payload["model_config"]["decoder_dim"] == 16
    assert payload["training_data"] == "synthetic clips from static images"  # what the report labels by
    assert load_checkpoint(project / "models/pretrain/model.pt").config.backbone == "resnet18"
    (run,) = runs(project)
    assert run.info.run_name == "train-pretrain" and run.info.status == "FINISHED"
    assert run.data.tags["dvc_stage"] == "pretrain" and run.data.tags["git_commit"]
    assert run.data.params["pretrain.lr"] == "0.001" and "final_loss" in run.data.metrics
    assert loss_steps(project, run.info.run_id) == [1, 2, 3, 4]
    summary = training_summary(project, run.info.run_id)
    assert summary["workers"] == 2 and summary["global_batch"] == 2 and summary["restarts"] == 0
    overlays = MlflowClient(f"sqlite:///{project}/mlflow.db").list_artifacts(run.info.run_id, "overlays")
    assert [a.path for a in overlays] == ["overlays/step_000002.png", "overlays/step_000004.png"]
    # the model is logged to the run and registered as a version of the one STM model
    info = json.loads((project / "models/pretrain/model.json").read_text())
    store = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version("STM", info["version"])
    assert info["run_id"] == run.info.run_id == version.run_id and info["model_uri"] == f"models:/STM/{info['version']}"
    assert version.tags["stage"] == "pretrain" and run.data.tags["registered_model"] == f"STM/{info['version']}"


@pytest.mark.slow
def test_strmn_main_training_from_its_pretrained_model(project, ray_2cpu):
    """STRMN main training on videos (TBPTT clips, skip curriculum) starts from
    models/strmn-pretrain/model.pt and writes the strmn-named outputs."""
    from stm_core.model.checkpoint import save_checkpoint

    params = write_params(project)
    s = train_cmd.settings(params, "main", "strmn")
    torch.manual_seed(1)
    pretrained = STMNetwork(s.model)
    save_checkpoint(project / "models/strmn-pretrain/model.pt", pretrained)
    assert stm("--stage", "main", "--model", "strmn", "--params", str(params)) == 0
    metrics = json.loads((project / "metrics/train-main-strmn.json").read_text())
    assert metrics["steps"] == 6 and np.isfinite(metrics["final_loss"])
    assert curve_steps(project / "plots/train-main-strmn.csv")[-1] == 6
    payload = torch.load(project / "models/strmn-main/model.pt", weights_only=True)
    assert payload["kind"] == "strmn" and payload["model_config"]["norm"] == "group"
    assert payload["training_data"].startswith(str(project / "models/strmn-pretrain/model.pt") + " + davis videos")
    assert any(k.startswith("fusion.") for k in payload["state_dict"])
    # trained from the pretrained weights: a few steps move them only a little
    fresh = STMNetwork(s.model).state_dict()
    key = "query_encoder.res4.0.conv1.weight"
    start = pretrained.state_dict()[key]
    assert (payload["state_dict"][key] - start).norm() < (fresh[key] - start).norm()
    (run,) = runs(project)
    assert run.info.run_name == "train-strmn-main" and run.data.params["strmn.segment_length"] == "2"


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint(project, ray_2cpu, monkeypatch):
    """One worker process exits mid-run (step 3, after the checkpoint at step 2): Ray restarts the
    group, which resumes at step 2 and finishes; one MLflow run holds the whole loss curve."""
    params = write_params(project, train={"init": "none", "max_failures": 1})
    marker = project / "fault-marker"
    monkeypatch.setenv(train_cmd.FAULT_ENV, f"3:{marker}")
    assert stm("--stage", "main", "--params", str(params)) == 0
    assert marker.exists(), "the fault was not injected"
    metrics = json.loads((project / "metrics/train-main.json").read_text())
    assert metrics["steps"] == 6
    assert curve_steps(project / "plots/train-main.csv") == [1, 2, 3, 4, 5, 6], "the curve survives the restart"
    (run,) = runs(project)
    assert run.info.status == "FINISHED"
    summary = training_summary(project, run.info.run_id)
    assert summary["restarts"] == 1 and summary["resumed_from"] == 2
    assert run.data.metrics["resumed_from_step"] == 2
    # steps 1-3 before the crash (3 was logged? no: the worker died before reporting 3), 3-6 after
    assert set(loss_steps(project, run.info.run_id)) == set(range(1, 7))


@pytest.mark.slow
def test_rerun_after_failed_driver_resumes(project, ray_2cpu, monkeypatch):
    """No restarts allowed: the stage fails at step 3. Running it again resumes from step 2 in the
    same MLflow run (re-attached, no duplicate)."""
    params = write_params(project, train={"init": "none", "max_failures": 0})
    marker = project / "fault-marker"
    monkeypatch.setenv(train_cmd.FAULT_ENV, f"3:{marker}")
    assert stm("--stage", "main", "--params", str(params)) != 0
    (failed,) = runs(project)
    assert failed.info.status == "FAILED"
    assert stm("--stage", "main", "--params", str(params)) == 0  # marker exists: no second fault
    (run,) = runs(project)
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    metrics = json.loads((project / "metrics/train-main.json").read_text())
    assert metrics["steps"] == 6 and training_summary(project, run.info.run_id)["resumed_from"] == 2


@pytest.mark.parametrize("update, steps", [("clip", 1), ("segment", 2)])
def test_strmn_update_per_clip_or_per_segment(one_thread, update, steps):
    """strmn.update: one Adam step per clip batch, or one per TBPTT segment (6 frames, T = 3: 2)."""
    from contextlib import nullcontext

    from pipeline.train.step import make_train_step

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    frames, masks, valid = collate([moving_square_clip(rng, n=6) for _ in range(2)])
    net = STMNetwork(ModelConfig(**{**TINY_MODEL, "kind": "strmn", "norm": "group"}))
    strmn = StrmnParams(rule="C", slots=3, segment_length=3, update=update)
    tp = plain_loss(grad_clip=1.0)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    calls = []
    original = optimizer.step
    optimizer.step = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = [p.detach().clone() for p in net.fusion.h.parameters()]  # the update gate z's CNN
    step = make_train_step(Unroll(net, tp, strmn), net, optimizer, scaler, nullcontext(), tp, strmn)
    out = step(frames, masks, valid)
    assert len(calls) == steps and torch.isfinite(out.loss) and out.logits.shape[:2] == (2, 5)
    assert any(not torch.equal(b, p) for b, p in zip(before, net.fusion.h.parameters()))


@pytest.mark.slow
def test_train_bench_reports_clips_per_s_and_data_wait_from_the_real_input(project, ray_2cpu):
    """`python -m pipeline.train.input_bench --data`: the step fed by the training input (Ray Data), timed."""
    from pipeline.train import input_bench as bench

    common = ["--device", "cpu", "--backbone", "resnet18", "--decoder-dim", "16", "--crop", "32", "--batch", "2",
              "--warmup", "1", "--steps", "3", "--threads", "1"]
    real = bench.main([*common, "--data", str(project / "data/synthetic/stm")])
    assert real["clips_per_s"] > 0 and 0 < real["data_wait_share"] < 1 and real["data"].endswith("synthetic/stm")
    alone = bench.main(common)
    assert alone["data_wait_share"] == 0 and alone["data"] == "random tensors"


@pytest.mark.slow
def test_strmn_rule_stage_trains_with_its_rule_into_its_own_folder(project, ray_2cpu):
    """`--rule I2M` (a train_strmn@I2M stage): its own outputs, run name and logged rule."""
    from stm_core.model.checkpoint import save_checkpoint

    params = write_params(project)
    s = train_cmd.settings(params, "main", "strmn")
    save_checkpoint(project / "models/strmn-pretrain/model.pt", STMNetwork(s.model))
    assert stm("--stage", "main", "--model", "strmn", "--rule", "I2M", "--params", str(params)) == 0
    assert (project / "models/strmn-main/I2M/model.pt").is_file()
    assert not (project / "models/strmn-main/model.pt").exists()
    metrics = json.loads((project / "metrics/train-main-strmn-I2M.json").read_text())
    # a video stage adds how many training videos it has and how many are short (strmn.short_videos)
    assert sorted(metrics) == ["clips_per_s", "dropped_videos", "final_loss", "short_videos", "steps", "videos"]
    assert metrics["videos"] == 3 and metrics["dropped_videos"] <= metrics["short_videos"] <= metrics["videos"]
    assert (project / "plots/train-main-strmn-I2M.csv").is_file()
    by_name = {r.info.run_name: r for r in runs(project)}  # the fine-tuning and its per-rule parent run
    assert set(by_name) == {"train-strmn-main", "train-strmn-main-I2M"}, sorted(by_name)
    run, parent = by_name["train-strmn-main-I2M"], by_name["train-strmn-main"]
    assert run.data.params["strmn.rule"] == "I2M" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id


class _Shard:
    """Stands in for a rank's streaming-split shard: batches in the order Ray Data hands them out."""

    def __init__(self, steps: list[int]):
        self.steps, self.pulled = steps, 0

    def iter_torch_batches(self, **_):
        for s in self.steps:
            self.pulled += 1
            yield {"frames": torch.zeros(1, 2, 8, 8, 3, dtype=torch.uint8), "masks": torch.zeros(1, 2, 8, 8),
                   "n_objects": torch.ones(1), "step": torch.tensor([s])}


def test_resumed_ranks_skip_the_same_number_of_video_batches(monkeypatch):
    """After a restart at step 3 every rank drops exactly 3 batches, whatever steps its rows carry:
    a rank that skipped more would reach Ray Data's epoch barrier while the others wait for it in the
    all-reduce (the two-node hang)."""
    import ray.train

    from pipeline.train.loop import data_batches

    # Rows are not step-aligned across ranks: rank 0 sees an early row late, rank 1 a late row early.
    layouts = {0: [0, 1, 2, 0, 3, 4, 5, 6], 1: [0, 4, 1, 2, 3, 5, 6, 6]}
    config = loop_config(data=video_data("videos"), per_worker_batch=1, seed=0)
    pulled = {}
    for rank, steps in layouts.items():
        shard = _Shard(steps)
        monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name, s=shard: s)
        batches = data_batches(config, rank, 2, start=3)
        for _ in range(7 - 3):  # the resumed run's remaining steps
            next(batches)
        pulled[rank] = shard.pulled
    assert pulled == {0: 7, 1: 7}, pulled


def test_in_process_training_uses_the_machines_cpus_and_ranks_their_share(tmp_path, monkeypatch):
    """num_workers 0 trains in the driver's process: all its CPUs (at most ray.num_cpus) as torch
    threads. DDP ranks get cpus_per_worker threads each."""
    from pipeline.train import driver

    (tmp_path / ".git").mkdir()
    (tmp_path / "data/raw/builtin-videos").mkdir(parents=True)
    monkeypatch.setattr(driver.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    threads = {}
    for workers, num_cpus in ((0, None), (0, 2), (2, None)):
        path = write_params(tmp_path, ray={"num_workers": workers, "num_cpus": num_cpus, "cpus_per_worker": 1})
        s = train_cmd.settings(path, "main", "stm")
        threads[workers, num_cpus] = driver.loop_config(s, max(1, workers), None, "data").threads
    assert threads == {(0, None): 4, (0, 2): 2, (2, None): 1}


def clip_digests(batches) -> list[tuple[int, str]]:
    """(step, digest of frames + masks) per clip, sorted: the clips whatever their order."""
    import hashlib

    out = []
    for b in batches:
        for i in range(len(b["step"])):
            blob = b["frames"][i].numpy().tobytes() + b["masks"][i].numpy().tobytes()
            out.append((int(b["step"][i]), hashlib.sha256(blob).hexdigest()))
    return sorted(out)


@pytest.mark.slow
def test_in_process_shard_gives_the_clips_of_ray_data(project, ray_2cpu):
    """LocalShard (num_workers 0, no Ray) makes the very clips Ray Data makes, videos and Parquet."""
    from pipeline.train.driver import loop_config
    from pipeline.train.input import build_dataset
    from pipeline.train.local_shard import LocalShard

    params = write_params(project, ray={"num_workers": 0})
    for stage in ("main", "pretrain"):
        s = train_cmd.settings(params, stage, "stm")
        config = loop_config(s, 1, None, s.data_location())
        steps, batch = s.stage_params.steps, s.batch_size
        local = list(LocalShard(config, steps, batch).iter_torch_batches(batch_size=batch))
        on_ray = list(build_dataset(config, steps, batch, materialize=True).iter_torch_batches(batch_size=batch))
        assert len(local) == (steps + 1 if stage == "main" else 8 // batch), stage
        assert clip_digests(local) == clip_digests(on_ray), stage
        shuffled = LocalShard(config, steps, batch).iter_torch_batches(batch_size=batch, local_shuffle_buffer_size=64,
                                                                      local_shuffle_seed=3)
        assert clip_digests(shuffled) == clip_digests(local), stage


@pytest.mark.slow
def test_in_process_stage_starts_no_ray(project, monkeypatch):
    """`ray.num_workers: 0` on one machine: Ray Train's local mode in the stage's own process, clips
    from LocalShard; Ray is never started, the outputs and the MLflow run are the usual ones."""
    from pipeline import cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("an in-process stage on one machine must not start Ray")

    monkeypatch.setattr(cluster, "init_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    params = write_params(project, ray={"num_workers": 0})
    assert stm("--stage", "pretrain", "--params", str(params)) == 0
    assert stm("--stage", "main", "--params", str(params)) == 0
    metrics = json.loads((project / "metrics/train-main.json").read_text())
    assert metrics["steps"] == 6 and np.isfinite(metrics["final_loss"])
    assert curve_steps(project / "plots/train-main.csv") == [1, 2, 3, 4, 5, 6]
    main = [r for r in runs(project) if r.info.run_name == "train-main"]
    assert len(main) == 1 and main[0].info.status == "FINISHED"
    summary = training_summary(project, main[0].info.run_id)
    assert summary["workers"] == 1 and summary["global_batch"] == 2


@pytest.mark.slow
def test_in_process_stage_resumes_after_a_crash(project):
    """The in-process stage dies after its checkpoint at step 2; run again, it resumes there, in the
    same MLflow run, and the loss curve has every step once."""
    import os
    import subprocess
    import sys

    params = write_params(project, ray={"num_workers": 0}, pretrain={"checkpoint_every": 2})
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DVC_ROOT")}
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--stage", "pretrain", "--params", str(params)]
    marker = project / "fault.marker"
    first = subprocess.run(cmd, cwd=project, env={**env, train_cmd.FAULT_ENV: f"3:{marker}"}, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode != 0 and marker.is_file(), first.stdout[-3000:] + first.stderr[-3000:]
    assert not (project / "models/pretrain/model.pt").exists()
    second = subprocess.run(cmd, cwd=project, env={**env, train_cmd.FAULT_ENV: f"3:{marker}"}, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from the checkpoint at step 2" in second.stdout, second.stdout[-3000:]
    assert curve_steps(project / "plots/train-pretrain.csv") == [1, 2, 3, 4]
    (run,) = runs(project)
    assert run.info.status == "FINISHED" and training_summary(project, run.info.run_id)["restarts"] == 1
