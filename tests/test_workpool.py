"""The actor pool (pipeline.workpool, used by stm segment and stm evaluate) heals: an actor whose
process dies is replaced and its item runs again; only an item that kills every actor fails."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pipeline.workpool import Item, PoolSpec, run_pool

pytestmark = pytest.mark.slow


class DyingWorker:
    """Dies (the whole process, as the OOM killer ends it) on an item's first `deaths` tries."""

    def __init__(self, tries_dir: str):
        self.tries = Path(tries_dir)

    def run(self, item: tuple[str, int]) -> dict:
        key, deaths = item
        mark = self.tries / key
        tried = int(mark.read_text()) if mark.exists() else 0
        mark.write_text(str(tried + 1))
        if tried < deaths:
            os._exit(1)
        return {"key": key, "pid": os.getpid(), "tries": tried + 1}


def test_a_dead_actor_is_replaced_and_only_an_item_that_always_kills_fails(tmp_path, ray_2cpu, capsys):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors' class travels whole, not by module name
    items = [Item("fine", 1, ("fine", 0)), Item("once", 3, ("once", 1)), Item("always", 2, ("always", 99))]
    spec = PoolSpec(num_cpus=1, actors=2, retries=2)
    outcomes = {o.key: o for o in run_pool(DyingWorker, (str(tmp_path),), items, spec)}
    assert outcomes["fine"].error is None and outcomes["fine"].value["tries"] == 1
    assert outcomes["once"].error is None and outcomes["once"].value["tries"] == 2  # a new actor ran it again
    assert outcomes["always"].value is None and outcomes["always"].error.startswith("worker died 3 times")
    assert (tmp_path / "always").read_text() == "3"  # tried 1 + retries times, no more
    err = capsys.readouterr().err
    assert "a worker died running once" in err and "try 2 of 3" in err
