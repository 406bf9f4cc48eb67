"""Memory, node-local disk and stage times of the papers' path as the data grow, on nodes with less
disk than the data.

    python benchmarks/data_scale.py [--scales 1 4] [--node-disk-mb 64] [--steps 8] [--json OUT]
                                    [--base-images 24] [--size 384] [--plant-copy]

Each scale runs on a fresh one-machine cluster (`tests/loopback.py`, the fixture the tests use): a
head with 0 CPUs and two worker nodes, each in its own mount namespace whose node-local disk (/tmp,
TMPDIR, the caches, ~/.cache) is a tmpfs of `--node-disk-mb`; the store on a loopback S3 server;
an authenticated MLflow server. Every stage's driver runs on worker node 0: download, synthesize
(both sets), STM and STRMN pretraining (STRMN on the plateau schedule, with its validation), main
training of both models, evaluation of three variants, report, and `stm segment` of the store
dataset. Sampled every 0.5 s while the stages run: each node's resident memory (the sum over all
its processes) and its tmpfs use; the stage times. `--plant-copy` copies the STRMN set onto node
0's disk after synthesis (`storage.node_cache`), so the disk bound can be seen to fail.

The bounds (printed, and in the JSON): every stage completes at every scale; per node, peak RSS
growth from the first to the last scale at most 10% of the data's growth; pretraining and main
training time at the last scale at most 1.25x that at the first (fixed steps); peak node-local
disk at most 25% of the data at the last scale.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests import loopback as lb  # noqa: E402 - the fixture lives with the tests

ROOT = "s3://stm/run"
STAGES = (("download", ["download"]), ("synthesize", ["synthesize"]),
          ("pretrain-stm", ["train", "--stage", "pretrain", "--model", "stm"]),
          ("pretrain-strmn", ["train", "--stage", "pretrain", "--model", "strmn"]),
          ("train-stm", ["train", "--stage", "main", "--model", "stm"]),
          ("train-strmn", ["train", "--stage", "main", "--model", "strmn", "--rule", "C"]),
          ("evaluate", ["evaluate"]), ("report", ["report"]))
TIMED = ("pretrain-stm", "pretrain-strmn", "train-stm", "train-strmn")


def scaled_params(scale: int, steps: int, images: int, size: int) -> dict:
    """params.yaml with `scale` x the images, videos and clips at `size` px; the same steps."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    src = p["download"]["sources"]
    p["download"]["sources"] = {
        "builtin-images": {**src["builtin-images"], "count": images * scale, "size": size},
        "builtin-videos": {**src["builtin-videos"], "style": "easy", "height": size, "width": size, "frames": 10,
                           "train_sequences": 4 * scale, "val_sequences": 3},
    }
    p["download"]["keep_archives"] = False
    p["synthesize"].update(sets={"stm": {"frames": 3, "clips": 8 * images * scale // 3, "sources": None, "val_clips": 0},
                                 "strmn": {"frames": 3, "clips": 8 * images * scale // 3, "sources": None,
                                           "val_clips": 4}},
                           height=size, width=size, clips_per_shard=16, num_actors=2, val_share=0.2)
    p["model"].update(decoder_dim=16, fusion_dim=8)
    p["strmn"].update(pretrain_steps=steps, main_steps=steps, pretrain_frames=3, main_frames=5, batch_size=2,
                      rules=["C"], pretrain_lr_schedule="plateau")
    common = dict(steps=steps, batch_size=2, crop=96, warmup_steps=0, checkpoint_every=steps, log_every=steps,
                  log_images_every=0, shuffle_buffer=8, materialize=False)
    p["pretrain"].update(common, val_every=max(1, steps // 2), val_clips=2, plateau_patience=1)
    p["train"].update(common, max_skip=2)
    p["ray"].update(num_workers=2, cpus_per_worker=1.0, data_max_actors=1, eval_actors=2,
                    placement_strategy="SPREAD")
    p["memory"].update(slots=3)
    p["evaluate"].update(variants=["copy-first", "stm:first", "strmn:C"], max_sequences=2, overlays=0, num_cpus=1.0,
                         max_size=128, probe_sequences=0, dataset=f"{ROOT}/data/raw/builtin-videos",
                         stm_model=f"{ROOT}/models/main/model.pt",
                         strmn_model=f"{ROOT}/models/strmn-main/{{rule}}/model.pt")
    p["storage"] = {"root": ROOT, "cache_mb": 0}
    p["mlflow"] = {"experiment": "data-scale", "tracking_uri": ""}
    return p


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants (a node: `ray start`, raylet, workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Sampler:
    """Peak RSS per node (head included) and peak tmpfs use per worker node, polled in a thread."""

    def __init__(self, cluster: lb.Cluster, head_pid: int, every: float = 0.5):
        self.cluster, self.head_pid, self.every = cluster, head_pid, every
        self.rss = {"head": 0, **{n.name: 0 for n in cluster.nodes}}
        self.disk = {n.name: 0 for n in cluster.nodes}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.every):
            self.rss["head"] = max(self.rss["head"], tree_rss(self.head_pid))
            for n in self.cluster.nodes:
                self.rss[n.name] = max(self.rss[n.name], tree_rss(n.proc.pid))
                try:
                    self.disk[n.name] = max(self.disk[n.name], n.disk_used())
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def plant_copy(cluster: lb.Cluster, proj: Path) -> None:
    """A whole-set copy on node 0 (what the disk bound must catch)."""
    code = f"from pipeline import storage; print(storage.node_cache('{ROOT}/data/synthetic/strmn'))"
    done = cluster.run_on(0, [sys.executable, "-c", code], proj, 600, PYTHONPATH=str(REPO))
    print(f"  planted copy: rc {done.returncode} {done.stderr.strip().splitlines()[-1:] }", flush=True)


def run_scale(scale: int, args: argparse.Namespace, work: Path) -> dict:
    base = Path(tempfile.mkdtemp(prefix=f"dsc{scale}-", dir=work))
    procs = lb.Processes(str(base))
    stages: dict[str, float] = {}
    failed: dict[str, str] = {}
    data, sampler = 0, None
    try:
        services = lb.start_services(procs, base)
        cluster = lb.start_cluster(services, base, workers=2, cpus=2, disk_mb=args.node_disk_mb, tag="c",
                                   pythonpath=str(REPO))
        head_pid = cluster.procs.procs[0].pid
        proj = lb.project_copy(REPO, base / "proj")
        (proj / "params-scale.yaml").write_text(yaml.safe_dump(scaled_params(scale, args.steps, args.base_images,
                                                                             args.size)))
        sampler = Sampler(cluster, head_pid)
        try:
            segment = ["segment", "--checkpoint", f"{ROOT}/models/main/model.pt", "--dataset",
                       f"{ROOT}/data/raw/builtin-videos", "--out", f"{ROOT}/segment", "--workers", "2"]
            runs = [(n, c if n == "report" else [*c, "--params", "params-scale.yaml"]) for n, c in STAGES]
            for name, cmd in [*runs, ("segment", segment)]:
                t0 = time.perf_counter()
                done = cluster.run_on(0, [sys.executable, "-m", "pipeline.cli", *cmd], proj, 3600, PYTHONPATH=str(REPO))
                stages[name] = round(time.perf_counter() - t0, 1)
                (base / f"{name}.log").write_text(done.stdout + done.stderr)
                print(f"  scale {scale}: {name} {stages[name]:.0f} s (rc {done.returncode})", flush=True)
                if done.returncode != 0:
                    failed[name] = (done.stdout + done.stderr).strip().splitlines()[-1][-300:]
                    if name in ("download", "synthesize"):
                        break
                if name == "download":  # the benchmark in the bucket, as a user puts it there
                    code = ("from pathlib import Path; from pipeline import storage; storage.publish("
                            f"Path('data/raw/builtin-videos'), '{ROOT}/data/raw/builtin-videos')")
                    cluster.run_on(0, [sys.executable, "-c", code], proj, 600, PYTHONPATH=str(REPO))
                if name == "synthesize" and args.plant_copy:
                    plant_copy(cluster, proj)
        finally:
            sampler.stop()  # after every stage, before the cluster goes
            data = sum(services.keys("run/data/").values())
            cluster.stop()
    finally:
        procs.stop()
        shutil.rmtree(base, ignore_errors=True)
    if sampler is None:
        raise RuntimeError(f"scale {scale}: the cluster did not start")
    return {"scale": scale, "data_mb": round(data / 2**20, 1), "node_disk_mb": args.node_disk_mb,
            "peak_rss_mb": {k: round(v / 2**20, 1) for k, v in sampler.rss.items()},
            "peak_node_disk_mb": {k: round(v / 2**20, 2) for k, v in sampler.disk.items()},
            "stages": stages, "failed": failed}


def bounds(runs: list[dict]) -> dict:
    """The four bounds between the first and the last scale."""
    a, b = runs[0], runs[-1]
    growth = b["data_mb"] - a["data_mb"]
    rss = {n: round(b["peak_rss_mb"][n] - a["peak_rss_mb"][n], 1) for n in a["peak_rss_mb"]}
    times = {s: round(b["stages"].get(s, 0) / max(a["stages"].get(s, 1e-9), 1e-9), 2) for s in TIMED}
    disk = max(b["peak_node_disk_mb"].values())
    return {
        "every_stage_completes": all(not r["failed"] and len(r["stages"]) == len(STAGES) + 1 for r in runs),
        "disk_below_half_the_data_at_first": a["node_disk_mb"] <= a["data_mb"] / 2,
        "rss_growth_mb": rss, "rss_growth_within_10pct_of_data_growth": all(g <= 0.1 * growth for g in rss.values()),
        "time_ratio": times, "time_within_1.25x": all(t <= 1.25 for t in times.values()),
        "peak_node_disk_mb": disk, "disk_within_25pct_of_data": disk <= 0.25 * b["data_mb"],
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=8, help="training steps per stage, the same at every scale")
    ap.add_argument("--node-disk-mb", type=int, default=64, help="each worker node's tmpfs")
    ap.add_argument("--base-images", type=int, default=24, help="built-in images at 1x (videos: 4 per scale)")
    ap.add_argument("--size", type=int, default=384, help="frame side in pixels (the papers train at 384)")
    ap.add_argument("--plant-copy", action="store_true", help="copy the STRMN set onto node 0 (the bound must fail)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stmds-", dir="/var/tmp"))  # short paths: Unix sockets
    load = os.getloadavg()
    try:
        runs = [run_scale(s, args, work) for s in args.scales]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"runs": runs, "bounds": bounds(runs), "steps": args.steps,
              "machine": f"{cpu_model()}, {os.cpu_count()} CPUs", "load_before": load, "load_after": os.getloadavg()}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
