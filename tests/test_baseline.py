"""The committed baseline (dvc.lock + the small outputs) matches dvc.yaml and the current params.

If this fails after a change to params.yaml or dvc.yaml, refresh the baseline: `stm baseline`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
REFRESH = "refresh it with `stm baseline` (docs/experiments.md)"


def lookup(params: dict, key: str):
    node = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def declared_stages():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        out = {}
        for stage in repo.index.stages:
            params = [p for d in stage.deps if d.def_path == "params.yaml" for p in (d.params or [])]
            deps = sorted(d.def_path for d in stage.deps if d.def_path != "params.yaml")
            outs = sorted(o.def_path for o in stage.outs)
            small = sorted(o.def_path for o in stage.outs if not o.use_cache)
            out[stage.addressing] = {"cmd": stage.cmd, "params": params, "deps": deps, "outs": outs, "small": small}
        return out


def test_committed_lock_names_the_current_params_and_stages():
    lock_file = ROOT / "dvc.lock"
    assert lock_file.is_file(), f"no dvc.lock in the repository: {REFRESH}"
    lock = yaml.safe_load(lock_file.read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = declared_stages()
    assert set(lock) == set(stages), f"dvc.lock stages {sorted(lock)} != dvc.yaml stages {sorted(stages)}: {REFRESH}"
    problems = []
    for name, stage in stages.items():
        locked = lock[name]
        if locked["cmd"] != stage["cmd"]:
            problems.append(f"{name}: cmd {locked['cmd']!r} != {stage['cmd']!r}")
        locked_params = (locked.get("params") or {}).get("params.yaml", {})
        if sorted(locked_params) != sorted(stage["params"]):
            problems.append(f"{name}: params {sorted(locked_params)} != dvc.yaml {sorted(stage['params'])}")
        for key, value in locked_params.items():
            try:
                current = lookup(params, key)
            except KeyError:
                problems.append(f"{name}: params.yaml has no {key}")
                continue
            if current != value:
                problems.append(f"{name}: {key} is {current!r} in params.yaml, {value!r} in dvc.lock")
        if sorted(d["path"] for d in locked.get("deps", [])) != stage["deps"]:
            problems.append(f"{name}: deps differ from dvc.yaml")
        if sorted(o["path"] for o in locked.get("outs", [])) != stage["outs"]:
            problems.append(f"{name}: outs differ from dvc.yaml")
    assert not problems, f"the committed dvc.lock is not the current pipeline's ({REFRESH}):\n" + "\n".join(problems)


def test_small_outputs_of_the_baseline_are_committed():
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    if not tracked:
        pytest.skip("not a git checkout")
    small = sorted({p for stage in declared_stages().values() for p in stage["small"]})
    missing = [p for p in ["dvc.lock", *small] if p not in tracked]
    assert not missing, f"not committed: {missing}; {REFRESH}"


def test_baseline_refuses_uncommitted_changes(tmp_path):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    (tmp_path / "dvc.yaml").write_text("stages:\n  a: {cmd: cp in m.json, deps: [in], metrics: [{m.json: {cache: false}}]}\n")
    (tmp_path / "in").write_text('{"x": 1}\n')
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    (tmp_path / "in").write_text('{"x": 2}\n')  # an uncommitted input: no commit would match the lock
    stm = [sys.executable, "-m", "pipeline.cli", "baseline"]
    refused = subprocess.run(stm, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "uncommitted changes to ['in']" in refused.stderr, refused.stderr
    subprocess.run(["git", "commit", "-qam", "x=2"], cwd=tmp_path, env=env, check=True)
    done = subprocess.run(stm, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    last = subprocess.run(["git", "show", "--name-only", "--format=%s", "HEAD"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=True).stdout.split("\n")
    assert last[0].startswith("Baseline:") and set(filter(None, last[1:])) == {"dvc.lock", "m.json"}
    again = subprocess.run(stm, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "already current" in again.stderr
