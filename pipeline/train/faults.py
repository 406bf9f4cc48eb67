"""Fault injection for the tests of fault tolerance: one training worker dies once, at a given step."""

from __future__ import annotations

import os
from pathlib import Path


def node_id() -> str:
    """This process's Ray node, or "local" for an in-process run without a Ray instance."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def faulty_rank(nodes: list[str], driver_node: str | None) -> int:
    """Fault tests kill the last rank that runs on another node than the driver (the last rank on
    one machine): on a cluster, the restart must then come from the stored checkpoint."""
    remote = [r for r, n in enumerate(nodes) if driver_node and n != driver_node]
    return remote[-1] if remote else len(nodes) - 1


def inject_fault(marker: str, rank: int, step: int) -> None:
    """This worker process dies (once: the marker file remembers).

    It first waits until Ray Train has registered the reports already made: a crash within a
    moment of a report can otherwise lose that report's checkpoint (Ray processes reports
    asynchronously), and the run would resume from an earlier one.
    """
    import ray.train

    try:
        ray.train.get_all_reported_checkpoints(timeout_s=120)
    except Exception as err:  # noqa: BLE001 - alpha API; the crash must happen regardless
        print(f"[train] fault injection: could not wait for reported checkpoints: {err}", flush=True)
    Path(marker).write_text(f"{os.getpid()} {step} {node_id()}\n")
    print(f"[train] fault injection: worker rank {rank} (pid {os.getpid()}) exits at step {step}", flush=True)
    os._exit(1)
