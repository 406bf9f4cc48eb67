"""Would these params run on a multi-node cluster? The same checks the stages make when they start
(`cluster.require_shared`, `cluster.resolve_tracking_uri`), made up front from the params alone, so
infra files and a user's params can be checked without a cluster:

    python -m pipeline.preflight params-paper.yaml --nodes 3

Storage comes from params `storage.root` or $STM_STORAGE_ROOT, tracking from `mlflow.tracking_uri` or
$MLFLOW_TRACKING_URI, exactly as the stages read them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import storage, tracking
from pipeline.cluster import ClusterError, require_shared, resolve_tracking_uri
from pipeline.params import ParamsError, load_params, section


def fake_nodes(count: int) -> list[dict]:
    return [{"NodeID": f"node{i}", "NodeManagerAddress": f"10.0.0.{i + 1}", "Alive": True} for i in range(count)]


def check(params_file: str | Path, nodes: list[dict], driver_ip: str) -> dict[str, str]:
    """Raise ClusterError / ParamsError naming the first problem; -> every stage's shared locations
    and the tracking URI the workers would use."""
    from pipeline.synthesize import SynthesizeParams
    from pipeline.synthesize import shared_locations as synth_locations
    from pipeline.train.settings import settings, shared_locations

    params = load_params(params_file)
    root = tracking.workspace_root(params_file)
    store = storage.storage_root(params)
    found = {}
    locations = synth_locations(section(params, "synthesize", SynthesizeParams), root, store)
    require_shared("synthesize", locations, nodes)
    found.update(locations)
    for stage in ("pretrain", "main"):
        for kind in ("stm", "strmn"):
            locations = shared_locations(settings(params_file, stage, kind))
            require_shared("train", locations, nodes)
            found.update({f"{k} ({kind})": v for k, v in locations.items()})
    mlflow_p = section(params, "mlflow", tracking.MlflowParams)
    uri = tracking.tracking_uri(tracking.project_root(params_file), mlflow_p.tracking_uri)
    found["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(uri, nodes, driver_ip=driver_ip,
                                                     answers=lambda _: True)  # the params alone: no server is probed
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.preflight", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("params", help="params file")
    parser.add_argument("--nodes", type=int, default=2, help="nodes of the cluster to check against")
    parser.add_argument("--driver-ip", default="10.0.0.1", help="the driver (head) node's address")
    args = parser.parse_args(argv)
    try:
        found = check(args.params, fake_nodes(args.nodes), args.driver_ip)
    except (ClusterError, ParamsError, storage.StorageError) as err:
        print(f"preflight: {args.params}: {err}", file=sys.stderr)
        return 2
    for key, value in found.items():
        print(f"{key:32s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
