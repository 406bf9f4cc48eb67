"""Shared fixtures. `../shared/data` holds small real DAVIS-layout data; a user's clone lacks it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture()
def one_thread():
    """Other processes share these 2 cores: two OpenMP threads each would spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "davis-sample").is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (it ships beside the repo, not in it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def davis_sample(shared_data: Path) -> Path:
    return shared_data / "davis-sample"


@pytest.fixture(scope="module")
def ray_2cpu():
    """A local Ray with 2 CPUs for one test module (shut down after it if the module started it)."""
    import ray

    from pipeline.cluster import init_ray

    if os.environ.get("RAY_ADDRESS"):
        pytest.skip("RAY_ADDRESS is set: this test starts its own local Ray")
    started = not ray.is_initialized()
    init_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


# The suite's process loads native libraries with threads of their own (torch, onnxruntime, Ray's
# core worker, PyAV); their teardown at interpreter exit can crash after every result is reported
# (seen once: a segmentation fault after the summary line, so exit 139 in place of the status). The
# process therefore ends with the session's own status once pytest has written everything.
_SESSION_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _SESSION_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _SESSION_STATUS and not hasattr(config, "workerinput"):
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_SESSION_STATUS[-1])
