"""`ray submit infra/cluster-aws.yaml infra/submit.py -- PARAMS`, as docs/clusters.md writes it,
parsed by Ray's own `ray submit` command: the head runs infra/submit.py with PARAMS, which submits
the job `ray job submit ... -- bash infra/run-pipeline.sh PARAMS` runs, from the image's checkout."""

from __future__ import annotations

import importlib.util
import os
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def doc_command(start: str) -> list[str]:
    for line in (REPO / "docs" / "clusters.md").read_text().splitlines():
        if line.startswith(start):
            return shlex.split(line.split("  #")[0])
    raise AssertionError(f"docs/clusters.md has no line starting {start!r}")


def submit_module():
    spec = importlib.util.spec_from_file_location("stm_infra_submit", REPO / "infra" / "submit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ray_submit_line_runs_what_ray_job_submit_runs():
    pytest.importorskip("ray.scripts.scripts")
    from ray.scripts.scripts import submit

    argv = doc_command("ray submit ")
    ctx = submit.make_context("submit", argv[2:])  # what `ray submit` receives after its name
    cluster, script, script_args = ctx.params["cluster_config_file"], ctx.params["script"], ctx.params["script_args"]
    assert (REPO / cluster).is_file() and (REPO / script).is_file()
    # Ray runs `python ~/<basename> ARGS` on the head (ray.scripts.scripts.submit: command_parts)
    remote = ["python", os.path.join("~", os.path.basename(script)), *script_args]
    assert remote[:2] == ["python", "~/submit.py"]
    args = submit_module().parse(remote[2:])
    assert not args.no_wait

    job = doc_command("ray job submit --address")
    entry = job[job.index("--") + 1:]
    assert submit_module().entrypoint(args.params) == shlex.join(entry)
    assert args.params == entry[-1] == "params-paper.yaml" and (REPO / args.params).is_file()
    # the image holds the checkout submit.py uses as the job's working directory
    assert "/home/ray/stm" in (REPO / "infra" / "Dockerfile").read_text()
    assert submit_module().PROJECT == "/home/ray/stm"


def test_submit_script_defaults_to_the_embedded_params():
    assert submit_module().parse([]).params == "params.yaml"
    assert submit_module().entrypoint("params.yaml") == "bash infra/run-pipeline.sh params.yaml"
