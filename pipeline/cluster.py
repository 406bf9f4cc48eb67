"""Connect to Ray: an existing cluster when RAY_ADDRESS is set, else a local one on this machine."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None, object_store_memory: int | None = None, **kwargs):
    """`ray.init` once per process. `num_cpus` and `object_store_memory` only apply to a local
    (not yet running) Ray; a cluster's head decides its own resources, and Ray refuses them there.

    The dashboard is left off locally (it needs extra processes and ports the stages do not use);
    on a cluster the head's settings apply. Inside a `ray job submit` job, Ray sets RAY_ADDRESS,
    so every stage joins the cluster the job runs on.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = os.environ.get("RAY_ADDRESS") or None
    options: dict = {"address": address, "ignore_reinit_error": True, "log_to_driver": True}
    if address is None:
        options.update(num_cpus=num_cpus, include_dashboard=False)
        if object_store_memory is not None:
            options["object_store_memory"] = object_store_memory
        log.info("Ray: starting a local instance (num_cpus=%s)", num_cpus)
    else:
        log.info("Ray: connecting to the cluster at RAY_ADDRESS=%s", address)
    options.update(kwargs)
    return ray.init(**options)


def on_driver_node() -> dict:
    """Ray remote options that keep a task or actor on this driver's node.

    On a multi-node cluster the stage's local files (the job's working directory on the head:
    `data/raw/...`, Parquet shards a stage writes) exist on the driver's node only. Tasks that
    open such paths pass `**on_driver_node()` to `.options(...)` / `ray_remote_args`; on one
    machine it changes nothing. Needs Ray initialised.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
