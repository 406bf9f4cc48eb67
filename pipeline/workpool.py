"""A pool of Ray actors that works through a list of items, the longest first.

    from pipeline.workpool import Item, PoolSpec, run_pool

    items = [Item(key=name, cost=frames, payload=job) for ...]
    spec = PoolSpec(num_cpus=1, num_gpus=0, actors=None)           # None: as many as the cluster holds
    outcomes = run_pool(MyWorker, (ckpt_ref, settings), items, spec, on_done=write_row)
    failed = [o for o in outcomes if o.error]

`MyWorker` is a plain class (made a Ray actor here). The pool calls `worker.<spec.method>(payload)`
for each item on whichever actor is free. Each actor is built once with `actor_args` (so a
checkpoint is loaded once per actor, however many items it runs). With `spec.progress`, the pool
also passes a `progress=` keyword to the constructor: a handle whose `add.remote(key, units)` the
worker calls as it goes (e.g. every few frames), and the pool's `on_progress(key, units)` callback
sees those units on the driver (a progress bar).

What the pool does for you:
- items longest first (`cost`, ties keep their order: LPT, so no actor ends alone on a long item);
- actor count from `spec.actors`, else from the cluster's resources (at most one per item);
- before any work, it asks the autoscaler for the actors' resources (`request_resources`) and waits
  (at most `spec.wait_s`, saying so every `spec.say_every_s`) until a first actor has started: a
  cluster whose nodes have not joined yet is waited for, one that never fits an actor is an error;
- each payload is made (`Item.load`) and put in the object store when its item is dispatched, and
  dropped when it finishes (memory stays flat on long lists);
- a failed item (its exception) is recorded in its `Outcome.error` and the other items continue;
- an actor that dies (out of memory, its node lost, killed) is replaced by a new one, and its item
  runs again, at most `spec.retries` more times: only an item whose actor dies on every try fails
  ("worker died N times"). A new actor whose constructor fails counts as a death of that item.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


class PoolError(RuntimeError):
    """The pool could not start (no resources for one actor within the wait)."""


@dataclass
class Item:
    key: str  # unique name (a video, a (variant, sequence) pair); reported in outcomes and progress
    cost: float  # relative work (frames x objects ...): larger first
    payload: Any = None  # the method's argument; travels through the object store
    load: Callable[[], Any] | None = None  # makes the payload when the item is dispatched (big inputs
    # are then read one item at a time, not all up front); used instead of `payload` when given


@dataclass
class Outcome:
    key: str
    value: Any = None  # what the method returned (None when it failed)
    error: str | None = None  # "ExceptionType: message" of a failed item
    seconds: float = 0.0  # wall time from dispatch to completion


@dataclass
class PoolSpec:
    num_cpus: float = 1.0  # CPUs per actor
    num_gpus: float = 0.0  # GPUs per actor (1: one actor per GPU)
    actors: int | None = None  # how many actors; None: as many as the cluster's resources hold
    method: str = "run"  # the worker method called with each payload
    wait_s: float = 300.0  # how long to wait for resources for a first actor before PoolError
    say_every_s: float = 15.0  # while waiting, print what is missing this often
    can_grow: bool = True  # nodes may join (a cluster); False (a local Ray): no fit is an error at once
    progress: bool = False  # pass a `progress=` handle to the constructor (see module doc)
    retries: int = 2  # tries more for an item whose actor died (each on a new actor)
    options: dict = field(default_factory=dict)  # extra actor options (scheduling_strategy, runtime_env ...)


def by_cost(items: Sequence[Item]) -> list[Item]:
    """Longest first; equal costs keep their order."""
    return sorted(items, key=lambda item: -item.cost)


def actor_count(spec: PoolSpec, items: int, total: dict[str, float] | None = None) -> int:
    """spec.actors if given, else how many actors the cluster's resources (`total`, default
    ray.cluster_resources()) hold; at least 1, at most one per item."""
    if spec.actors is not None:
        if spec.actors < 1:
            raise PoolError(f"actors must be >= 1, got {spec.actors}")
        return max(1, min(spec.actors, items))
    if total is None:
        import ray

        total = ray.cluster_resources()
    fits = []
    if spec.num_gpus > 0:
        fits.append(int(total.get("GPU", 0) // spec.num_gpus))
    if spec.num_cpus > 0:
        fits.append(int(total.get("CPU", 0) // spec.num_cpus))
    fit = min(fits) if fits else items
    return max(1, min(fit, items))  # 0 fitting now: one, and the wait below says what is missing


class _Progress:
    """The progress sink (a Ray actor): workers add units, the driver drains them."""

    def __init__(self) -> None:
        self.units: dict[str, float] = {}

    def add(self, key: str, units: float) -> None:
        self.units[key] = self.units.get(key, 0) + units

    def drain(self) -> dict[str, float]:
        out, self.units = self.units, {}
        return out


def _request(spec: PoolSpec, n: int) -> None:
    """Ask the autoscaler (if the cluster has one) for n actors' worth of resources."""
    bundle = {k: v for k, v in (("CPU", spec.num_cpus), ("GPU", spec.num_gpus)) if v > 0}
    if not bundle:
        return
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[bundle] * n)
    except Exception as err:  # noqa: BLE001 - no autoscaler (local Ray): nothing to ask
        print(f"workpool: could not ask the autoscaler for resources ({err})", file=sys.stderr)


def _release_request() -> None:
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])
    except Exception:  # noqa: BLE001
        pass


def _wait_for_first(actors: list, spec: PoolSpec) -> None:
    """Block until one actor has started, saying what the cluster lacks; PoolError after spec.wait_s."""
    import ray

    probes = [a.__ray_ready__.remote() for a in actors]
    start = time.monotonic()
    while True:
        ready, _ = ray.wait(probes, num_returns=1, timeout=min(spec.say_every_s, spec.wait_s))
        if ready:
            ray.get(ready[0])  # a constructor that raised raises here
            return
        waited = time.monotonic() - start
        total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        need = {k: v for k, v in (("CPU", spec.num_cpus), ("GPU", spec.num_gpus)) if v > 0}
        fits = all(total.get(k, 0) >= v for k, v in need.items())  # else: no node could ever hold one
        if waited >= spec.wait_s or not (fits or spec.can_grow):
            why = ("the actors were placed but none finished starting (a slow constructor?)" if fits else
                   f"each needs {need}, the cluster has {total} in all (add nodes with those resources, or "
                   "lower the per-worker CPUs/GPUs)")
            raise PoolError(f"no actor started within {waited:.0f} s: {why}")
        if fits:
            print(f"workpool: {len(actors)} actor(s) starting ({waited:.0f} s)", file=sys.stderr)
        else:
            print(f"workpool: waiting for resources: each actor needs {need}, the cluster has {total} in all "
                  f"({waited:.0f} s of {spec.wait_s:.0f} s; the autoscaler was asked for them)", file=sys.stderr)


def run_pool(worker_cls: type, actor_args: tuple, items: Sequence[Item], spec: PoolSpec | None = None,
             on_done: Callable[[Outcome], None] | None = None,
             on_progress: Callable[[str, float], None] | None = None,
             at_end: Callable[[list], None] | None = None) -> list[Outcome]:
    """Run every item on a pool of `worker_cls` actors; -> one Outcome per item, in completion order.

    `on_done(outcome)` runs on the driver as each item finishes (write its results there);
    `on_progress(key, units)` as workers report units (spec.progress); `at_end(actors)` with the
    live actor handles once every item is done (to collect per-actor figures). Needs Ray
    initialised. Actors are killed at the end, also on errors and Ctrl-C.
    """
    import ray

    spec = spec or PoolSpec()
    queue = by_cost(items)
    if not queue:
        return []
    if len({i.key for i in queue}) != len(queue):
        raise PoolError("item keys must be unique")
    n = actor_count(spec, len(queue))
    _request(spec, n)
    options = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus,
               "scheduling_strategy": "SPREAD", **spec.options}  # SPREAD: fill every node, not the first
    # Any: Ray types a handle as `ActorHandle[T] | type[T]`, whose methods have no `.remote`, and
    # `ray.kill` takes only the first; worker_cls is any class, so its handles are untyped anyway
    actor_cls: Any = ray.remote(worker_cls).options(**options)
    sink: Any = ray.remote(_Progress).options(num_cpus=0).remote() if spec.progress else None
    kwargs = {"progress": sink} if sink is not None else {}
    actors = [actor_cls.remote(*actor_args, **kwargs) for _ in range(n)]
    outcomes: list[Outcome] = []
    pending: dict = {}  # ref -> (item, actor, payload ref, start)
    deaths: dict[str, int] = {}  # item key -> how many of its actors died

    def finish(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if on_done is not None:
            on_done(outcome)

    def drain() -> None:
        if sink is not None and on_progress is not None:
            for key, units in ray.get(sink.drain.remote()).items():
                on_progress(key, units)

    try:
        _wait_for_first(actors, spec)
        idle = list(actors)
        position = 0
        while position < len(queue) or pending:
            while idle and position < len(queue):
                item = queue[position]
                position += 1
                actor = idle.pop(0)
                try:
                    box = ray.put(item.load() if item.load is not None else item.payload)
                except Exception as err:  # noqa: BLE001 - an unreadable input fails its item only
                    idle.append(actor)
                    finish(Outcome(item.key, error=f"{type(err).__name__}: {err}"))
                    continue
                ref = getattr(actor, spec.method).remote(box)
                pending[ref] = (item, actor, box, time.monotonic())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)  # short: Ctrl-C lands between waits
            drain()
            for ref in done:
                item, actor, box, start = pending.pop(ref)
                outcome = Outcome(item.key, seconds=time.monotonic() - start)
                try:
                    outcome.value = ray.get(ref)
                    idle.append(actor)
                except ray.exceptions.RayActorError as err:  # the actor died (OOM, node lost, killed)
                    deaths[item.key] = deaths.get(item.key, 0) + 1
                    why = str(err).splitlines()[0] if str(err) else type(err).__name__
                    actors.remove(actor)
                    ray.kill(actor)
                    retry = deaths[item.key] <= spec.retries
                    print(f"workpool: a worker died running {item.key} ({why}); "
                          + (f"a new worker runs it again (try {deaths[item.key] + 1} of {spec.retries + 1})"
                             if retry else "no tries left"), file=sys.stderr, flush=True)
                    if retry or position < len(queue):  # a new actor keeps the pool at its size
                        fresh = actor_cls.remote(*actor_args, **kwargs)
                        actors.append(fresh)
                        idle.append(fresh)
                    if retry:
                        queue.insert(position, item)  # next in line
                        del box, ref
                        continue
                    outcome.error = f"worker died {deaths[item.key]} times: {why}"
                except Exception as err:  # noqa: BLE001 - RayTaskError wraps the worker's exception
                    cause = getattr(err, "cause", None) or err
                    outcome.error = f"{type(cause).__name__}: {cause}"
                    idle.append(actor)
                del box, ref  # the payload leaves the object store once nothing holds it
                finish(outcome)
        drain()
        if at_end is not None:
            at_end(list(actors))
    finally:
        for a in actors:
            ray.kill(a)
        if sink is not None:
            ray.kill(sink)
        _release_request()
    return outcomes
