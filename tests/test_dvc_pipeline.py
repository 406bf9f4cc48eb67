"""The real dvc.yaml, run by real DVC on a tiny copy of params.yaml: what re-runs when, which params
each stage really reads, and what `dvc exp show` prints.

One module fixture copies the project (code, dvc.yaml, DVC config) into a fresh git repo, shrinks
every size in params.yaml (all keys stay, so every read is seen) and runs `dvc repro` once with
`STM_PARAMS_READS` set: each stage process notes the params keys it read. The tests then check
those reads against dvc.lock, a second `dvc repro` that does nothing, `dvc exp run -S memory.slots=5`
(evaluate + report only), `-S ray.storage=...` (nothing), and the README's `dvc exp show` line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.params import PLACEMENT_KEYS, READS_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2700)]  # the whole tiny pipeline: minutes

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COPY = ["pipeline", "stm_core", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore", "README.md"]
EXP_SHOW_WIDTH = 200


def tiny_params(params: dict, root: Path) -> dict:
    """Every size shrunk; every key kept."""
    src = params["download"]["sources"]
    src["builtin-images"].update(count=12, size=48)
    src["builtin-videos"].update(height=48, width=48, frames=6, train_sequences=2, val_sequences=2, max_objects=2)
    params["synthesize"].update(height=48, width=48, clips_per_shard=8, num_actors=1,
                                sets={"stm": {"frames": 3, "clips": 8}, "strmn": {"frames": 5, "clips": 8}})
    params["model"].update(decoder_dim=16, fusion_dim=8)
    params["strmn"].update(main_frames=4, segment_length=2, batch_size=2)
    params["training"].update(batch_size=2, crop=32, warmup_steps=0, checkpoint_every=2, log_every=1,
                              log_images_every=0, shuffle_buffer=4)
    params["pretrain"]["steps"] = 2
    params["train"].update(steps=2, max_skip=1)
    params["ray"].update(num_workers=0, num_cpus=2)
    params["evaluate"]["overlays"] = 1  # every default variant stays: `dvc exp show` must fit all of them
    return params


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("dvcproject")
    for rel in COPY:
        src, dst = REPO / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst)
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()), root)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    reads = root.parent / "reads.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", READS_ENV)}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(root),  # the copy's code runs
               DVC_NO_ANALYTICS="1", RAY_USAGE_STATS_ENABLED="0", COLUMNS=str(EXP_SHOW_WIDTH),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(["git", "init", "-q"], root, env)
    run([*git, "add", "-A"], root, env)
    run([*git, "commit", "-qm", "project"], root, env)
    started = time.monotonic()
    # The README's baseline command: dvc repro, then commit dvc.lock + the small outputs.
    first = run(["stm", "baseline"], root, {**env, READS_ENV: str(reads)}, timeout=1500)
    took = time.monotonic() - started
    print(f"\ntiny stm baseline (dvc repro + commit): {took:.0f} s")
    return {"root": root, "env": env, "first": first.stdout + first.stderr, "reads": reads, "git": git}


def declared_params(root: Path) -> dict[str, set[str]]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {name: set((stage.get("params") or {}).get("params.yaml", {})) for name, stage in lock.items()}


def test_baseline_commit_holds_the_lock_and_small_outputs(project):
    root, env = project["root"], project["env"]
    committed = run(["git", "show", "--name-only", "--format=%s", "HEAD"], root, env).stdout.split("\n")
    assert committed[0].startswith("Baseline:"), committed
    files = set(filter(None, committed[1:]))
    assert {"dvc.lock", "metrics/summary.json", "metrics/train-main.json", "plots/train-main.csv",
            "reports/ablation.md", "reports/ablation.png"} <= files, files
    assert not any(f.startswith(("models/", "data/", "results/")) for f in files), files
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], root, env).stdout == ""
    diff = run(["dvc", "metrics", "diff", "HEAD"], root, env).stdout
    assert "metrics/summary.json" not in diff, f"the workspace should equal the baseline:\n{diff}"


def test_every_stage_ran_once_and_reads_exactly_its_declared_params(project):
    assert sorted(stages_run(project["first"])) == sorted(declared_params(project["root"]))
    reads: dict[str, set[str]] = {}
    for line in project["reads"].read_text().splitlines():
        record = json.loads(line)
        if record["stage"]:
            reads.setdefault(record["stage"], set()).update(record["reads"])
    declared = declared_params(project["root"])
    assert set(reads) <= set(declared), f"reads from processes that are no stage: {set(reads) - set(declared)}"
    assert set(reads) >= {s for s, keys in declared.items() if keys}, "a stage with params never loaded them"
    problems = []
    for stage, keys in declared.items():  # report reads no params at all: nothing to declare
        leaves = {r for r in reads.get(stage, set()) if not r.endswith(".*")}
        touched = {r.removesuffix(".*") for r in reads.get(stage, set())}
        undeclared = sorted(r for r in leaves if r not in PLACEMENT_KEYS
                            and not any(r == d or r.startswith(d + ".") for d in keys))
        unread = sorted(d for d in keys if not any(t == d or t.startswith(d + ".") for t in touched))
        if undeclared:
            problems.append(f"{stage} reads {undeclared} but dvc.yaml does not list them")
        if unread:
            problems.append(f"{stage} lists {unread} in dvc.yaml but never reads them")
    assert not problems, "\n".join(problems)


def test_second_repro_does_nothing_in_seconds(project):
    started = time.monotonic()
    again = run(["dvc", "repro"], project["root"], project["env"])
    took = time.monotonic() - started
    assert stages_run(again.stdout) == [], again.stdout
    assert took < 60, f"a no-op dvc repro took {took:.0f} s"
    print(f"\nsecond dvc repro: {took:.1f} s")


def test_memory_setting_reruns_only_evaluate_and_report(project):
    done = run(["dvc", "exp", "run", "-n", "slots5", "-S", "memory.slots=5"], project["root"], project["env"])
    assert sorted(stages_run(done.stdout)) == ["evaluate", "report"], done.stdout


def test_placement_settings_rerun_nothing(project, tmp_path):
    for setting in (f"ray.storage={tmp_path / 'elsewhere'}", "ray.num_cpus=1", "mlflow.experiment=other"):
        done = run(["dvc", "exp", "run", "-S", setting], project["root"], project["env"])
        assert stages_run(done.stdout) == [], f"-S {setting} re-ran: {stages_run(done.stdout)}"


def readme_exp_show() -> list[str]:
    """The `dvc exp show ...` line the README gives for J&F per variant."""
    text = (REPO / "README.md").read_text()
    found = re.findall(r"^(dvc exp show [^#\n]*?)\s*(?:#.*)?$", text, flags=re.M)
    flagged = [line for line in found if "--keep" in line]
    assert flagged, "README: no `dvc exp show ... --keep ...` line"
    return shlex.split(flagged[0])


def test_readme_exp_show_fits_jf_per_variant_in_200_columns(project):
    root = project["root"]
    run(["dvc", "exp", "run", "-n", "every3", "-S", "memory.every=3"], root, project["env"])
    shown = run(readme_exp_show(), root, project["env"]).stdout
    lines = shown.splitlines()
    assert max(len(line) for line in lines) <= EXP_SHOW_WIDTH, shown
    labels = json.loads((root / "metrics/summary.json").read_text())["JF"]
    header = next(line for line in lines if "Experiment" in line)
    for label in labels:
        assert f"JF.{label}" in header, f"column JF.{label} missing or cut:\n{shown}"
    assert "…" not in header, f"columns left out:\n{shown}"
    rows = [line for line in lines if "every3" in line or "main" in line or "master" in line]
    assert len(rows) >= 2, shown  # the baseline and the experiment side by side


def test_training_curves_are_dvc_plots(project):
    root = project["root"]
    shown = json.loads(run(["dvc", "plots", "show", "--json"], root, project["env"]).stdout)
    plots = set(shown.get("data", shown))
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    training = {name for name, stage in lock.items() if stage["cmd"].startswith("stm train")}
    assert len(training) >= 4, sorted(training)
    for name in training:
        (curve,) = [o["path"] for o in lock[name]["outs"] if o["path"].startswith("plots/train-")]
        assert curve in plots, f"{name}: {curve} is not among DVC plots"
        (metrics,) = [o["path"] for o in lock[name]["outs"] if o["path"].startswith("metrics/train-")]
        rows = (root / curve).read_text().splitlines()
        steps = [int(r.split(",")[0]) for r in rows[1:]]
        assert rows[0] == "step,loss" and steps == sorted(set(steps)), (curve, rows)  # log_every = 1 here
        assert steps == list(range(1, json.loads((root / metrics).read_text())["steps"] + 1)), (curve, rows)
