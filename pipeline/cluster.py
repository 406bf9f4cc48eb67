"""Connect to Ray: an existing cluster when RAY_ADDRESS is set, else a local one on this machine."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None, **kwargs):
    """`ray.init` once per process. `num_cpus` only applies to a local (not yet running) Ray.

    The dashboard is left off locally (it needs extra processes and ports the stages do not use);
    on a cluster the head's settings apply.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = os.environ.get("RAY_ADDRESS") or None
    options: dict = {"address": address, "ignore_reinit_error": True, "log_to_driver": True}
    if address is None:
        options.update(num_cpus=num_cpus, include_dashboard=False)
    options.update(kwargs)
    return ray.init(**options)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
