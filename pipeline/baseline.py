"""Refresh the committed baseline: `dvc repro`, then commit dvc.lock and the small outputs.

`stm baseline [--no-commit] [--allow-dirty]`. The baseline is what `dvc exp show`, `dvc metrics
diff` and `dvc plots diff` compare an experiment with: dvc.lock plus every `cache: false` output
(metrics/, plots/, reports/), produced by the committed code and params.yaml. So this refuses to
run on uncommitted changes to tracked files (they would be hashed into a lock that no commit
matches), runs `dvc repro` (only what changed re-runs), checks that `dvc status` is clean, and
commits exactly those files. The large outputs (data, models, results) stay in DVC's cache.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

MESSAGE = "Baseline: dvc.lock and the embedded default's metrics, plots and report (stm baseline)"


class BaselineError(RuntimeError):
    pass


def _run(cmd: list[str], root: Path, capture: bool = True) -> str:
    done = subprocess.run(cmd, cwd=root, text=True, capture_output=capture)
    if done.returncode != 0:
        detail = (done.stdout or "") + (done.stderr or "") if capture else ""
        raise BaselineError(f"`{' '.join(cmd)}` failed with exit code {done.returncode}\n{detail[-3000:]}")
    return done.stdout if capture else ""


def baseline_files(root: Path) -> list[str]:
    """dvc.lock and every `cache: false` output of dvc.yaml, relative to root."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        outs = {str(Path(out.fs_path).relative_to(repo.root_dir))
                for stage in repo.index.stages for out in stage.outs if not out.use_cache}
    return ["dvc.lock", *sorted(outs)]


def dirty_files(root: Path, allowed: set[str]) -> list[str]:
    """Tracked files with uncommitted changes, other than the baseline's own."""
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], root)
    paths = [line[3:].split(" -> ")[-1] for line in status.splitlines() if line.strip()]
    return [p for p in paths if p not in allowed]


def refresh(root: Path, commit: bool = True, allow_dirty: bool = False) -> list[str]:
    files = baseline_files(root)
    dirty = dirty_files(root, set(files))
    if dirty and not allow_dirty:
        raise BaselineError(f"{root}: uncommitted changes to {dirty}; commit them first (the lock would hash code or "
                            "params that no commit holds), or pass --allow-dirty")
    _run([sys.executable, "-m", "dvc", "repro"], root, capture=False)  # its progress goes straight to the terminal
    status = _run([sys.executable, "-m", "dvc", "status"], root)
    if "up to date" not in status:
        raise BaselineError(f"`dvc status` after `dvc repro` is not clean:\n{status}")
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        raise BaselineError(f"{root}: outputs missing after `dvc repro`: {missing}")
    _run(["git", "add", "--", *files], root)
    if commit:
        if _run(["git", "diff", "--cached", "--name-only", "--", *files], root).strip():
            _run(["git", "commit", "-q", "-m", MESSAGE, "--", *files], root)
        else:
            print("stm baseline: the committed baseline is already current", file=sys.stderr)
    return files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-commit", action="store_true", help="stage the baseline files, do not commit them")
    parser.add_argument("--allow-dirty", action="store_true", help="run even with uncommitted changes to tracked files")
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root (default: here)")


def run(args: argparse.Namespace) -> int:
    try:
        files = refresh(args.root.resolve(), commit=not args.no_commit, allow_dirty=args.allow_dirty)
    except BaselineError as err:
        print(f"stm baseline: error: {err}", file=sys.stderr)
        return 2
    print(f"stm baseline: {'committed' if not args.no_commit else 'staged'} {len(files)} files: {' '.join(files)}")
    return 0
