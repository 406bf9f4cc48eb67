"""Memory and node-local disk of the cluster data path as the datasets grow.

    python benchmarks/data_scale.py [--scales 1 4] [--steps 12] [--json OUT]

For each scale, in a fresh copy of the project (the files `ray job submit --working-dir` uploads):
the built-in images and videos at `scale` x their base count, then `stm download`, `stm synthesize`
(clips in proportion to the images), `stm train --stage pretrain` and `--stage main`, each for the
same number of steps, through the cluster path: `storage.root` at a loopback S3 server (moto), 2 Ray
Train workers, streamed input (`materialize: false`). Writes

    {"runs": [{"scale": 1, "peak_rss_mb": ..., "node_local_mb": ..., "stages": {"download": s, ...}}, ...]}

`peak_rss_mb`: the largest peak resident set (VmHWM) of any process of the run (the stage, Ray's
workers and daemons), sampled every 0.2 s. `node_local_mb`: the bytes the run left on this node
outside the DVC outputs and the store (Ray's temp dir, caches, the project copy's other files).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "stm-scale"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
DVC_OUTPUTS = ("data", "models", "metrics", "plots", "results", "reports")  # dvc.yaml outs live under these
STAGES = (("download", ["download"]), ("synthesize", ["synthesize", "--set", "stm"]),
          ("pretrain", ["train", "--stage", "pretrain", "--model", "stm"]),
          ("train", ["train", "--stage", "main", "--model", "stm"]))


def scaled_params(scale: int, steps: int, store: str) -> dict:
    """params.yaml at small sizes with `scale` x the images, videos and clips; the same steps."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    src = p["download"]["sources"]
    p["download"]["sources"] = {
        "builtin-images": {**src["builtin-images"], "count": 32 * scale, "size": 64},
        "builtin-videos": {**src["builtin-videos"], "style": "easy", "height": 64, "width": 64, "frames": 12,
                           "train_sequences": 4 * scale, "val_sequences": 1},
    }
    p["synthesize"].update(sets={"stm": {"frames": 3, "clips": 64 * scale}}, height=64, width=64,
                           clips_per_shard=16, num_actors=1)
    p["model"].update(decoder_dim=16, fusion_dim=8)
    common = dict(steps=steps, batch_size=2, crop=48, warmup_steps=0, checkpoint_every=steps, log_every=steps,
                  log_images_every=0, shuffle_buffer=8, materialize=False)
    p["pretrain"].update(common)
    p["train"].update(common, max_skip=2)
    # 4 logical CPUs: the 2 training workers take 1 each and the streaming input keeps its own
    p["ray"].update(num_workers=2, cpus_per_worker=1.0, num_cpus=4, data_max_actors=1)
    p["storage"] = {"root": store, "cache_mb": 0}
    p["mlflow"] = {"experiment": "data-scale", "tracking_uri": ""}
    return p


def project_copy(dest: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3(log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {log.read_text()[-2000:]}") from None
            time.sleep(0.2)
    import boto3

    boto3.client("s3", endpoint_url=url, region_name=CREDS["AWS_DEFAULT_REGION"], aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    return proc, url


class PeakRss:
    """The largest VmHWM of `root` and its descendants, polled in a thread."""

    def __init__(self, root: int):
        self.root, self.peak_kb, self._stop = root, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        tree, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        return tree

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            for pid in self._tree():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                except OSError:
                    pass

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024


def folder_mb(path: Path, skip: tuple[Path, ...] = ()) -> float:
    total = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if Path(root, d) not in skip]
        total += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
    return total / 2**20


def run_scale(scale: int, steps: int, work: Path) -> dict:
    base = work / f"scale-{scale}"
    node = base / "node"  # everything node-local this run may leave: Ray's temp dir, caches, TMPDIR
    proj = project_copy(base / "proj")
    before = folder_mb(proj)
    for sub in ("tmp", "ray", "cache"):
        (node / sub).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env.update(CREDS, TMPDIR=str(node / "tmp"), RAY_TMPDIR=str(node / "ray"), STM_NODE_CACHE=str(node / "cache"),
               PYTHONUNBUFFERED="1")
    s3, url = start_s3(base / "moto.log", env)
    env.update(AWS_ENDPOINT_URL=url)
    stages: dict[str, float] = {}
    peak = 0.0
    try:
        (proj / "params-scale.yaml").write_text(yaml.safe_dump(scaled_params(scale, steps, f"s3://{BUCKET}/run")))
        for name, args in STAGES:
            cmd = [sys.executable, "-m", "pipeline.cli", *args, "--params", "params-scale.yaml"]
            log = base / f"{name}.log"
            t0 = time.perf_counter()
            with log.open("wb") as out:
                proc = subprocess.Popen(cmd, cwd=proj, env=env, stdout=out, stderr=subprocess.STDOUT)
                rss = PeakRss(proc.pid)
                rc = proc.wait()
                peak = max(peak, rss.stop())
            stages[name] = round(time.perf_counter() - t0, 1)
            print(f"  scale {scale}: {name} {stages[name]:.0f} s (rc {rc})", flush=True)
            if rc != 0:
                raise RuntimeError(f"`stm {' '.join(args)}` failed at scale {scale} (rc {rc}); log {log}:\n"
                                   f"{log.read_text()[-4000:]}")
    finally:
        os.killpg(s3.pid, 15) if s3.poll() is None else None
        s3.wait(timeout=20)
    outputs = tuple(proj / d for d in DVC_OUTPUTS)
    local = folder_mb(node) + max(0.0, folder_mb(proj, skip=outputs) - before)
    return {"scale": scale, "peak_rss_mb": round(peak, 1), "node_local_mb": round(local, 2),
            "dvc_outputs_mb": round(sum(folder_mb(o) for o in outputs if o.exists()), 2), "stages": stages}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=12, help="training steps per stage, the same at every scale")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--keep", type=Path, help="work here and keep it (default: a temp folder, removed)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="stm-scale-"))
    try:
        runs = [run_scale(s, args.steps, work) for s in args.scales]
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    first = runs[0]
    for r in runs:
        print(f"scale {r['scale']}: peak RSS {r['peak_rss_mb']:.0f} MB "
              f"({r['peak_rss_mb'] / first['peak_rss_mb']:.2f}x), node-local {r['node_local_mb']:.1f} MB "
              f"({r['node_local_mb'] / max(first['node_local_mb'], 1e-9):.2f}x), DVC outputs "
              f"{r['dvc_outputs_mb']:.1f} MB, stages {r['stages']}")
    result = {"runs": runs, "steps": args.steps, "machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
              "python": platform.python_version()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
