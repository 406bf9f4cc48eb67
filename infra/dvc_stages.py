"""Two things infra/run-pipeline.sh needs from DVC that its command line does not give.

    python infra/dvc_stages.py order [STAGE ...]    # stages in dependency order (with what they need)
    python infra/dvc_stages.py push-uncached STAGE  # push the stage's `cache: false` outputs

`order`: dvc.yaml lists `evaluate` first (so its summary leads `dvc exp show`); a job that pushes
after every stage must run them in dependency order. `push-uncached`: DVC's run cache also keeps
the outputs declared `cache: false` (metrics, plot data), and restores them from the run cache,
but `dvc push --run-cache` uploads only the run-cache entries and the cached outputs. Without the
metrics in the remote, a re-submitted job could not restore the stage and would run it again.
Everything else (what ran, with which inputs) is DVC's own run cache.
"""

from __future__ import annotations

import sys


def order(targets: list[str]) -> list[str]:
    import networkx as nx
    from dvc.repo import Repo

    with Repo() as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        by_name = {stage.addressing: stage for stage in graph}
        wanted = set(graph) if not targets else set()
        for target in targets:
            if target not in by_name:
                raise SystemExit(f"dvc_stages.py: no stage {target!r} in dvc.yaml; stages: {sorted(by_name)}")
            wanted |= {by_name[target], *nx.descendants(graph, by_name[target])}
        return [s.addressing for s in reversed(list(nx.topological_sort(graph))) if s in wanted]


def push_uncached(name: str) -> int:
    """Push the `cache: false` outputs of `name` (as dvc.lock records them) to the default remote;
    returns how many objects were transferred."""
    from dvc.repo import Repo

    with Repo() as repo:
        (stage,) = repo.stage.collect(name)
        objs = {out.hash_info for out in stage.outs if not out.use_cache and out.hash_info}
        missing = [str(out) for out in stage.outs if not out.use_cache and not out.hash_info]
        if missing:
            raise SystemExit(f"dvc_stages.py: {name}: no hash for {missing} in dvc.lock (did the stage run?)")
        if not objs:
            return 0
        return len(repo.cloud.push(objs).transferred)


def main(argv: list[str]) -> int:
    if argv[:1] == ["order"]:
        print("\n".join(order(argv[1:])))
        return 0
    if argv[:1] == ["push-uncached"] and len(argv) == 2:
        count = push_uncached(argv[1])
        print(f"dvc_stages.py: {argv[1]}: {count} uncached output object(s) pushed", file=sys.stderr)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
