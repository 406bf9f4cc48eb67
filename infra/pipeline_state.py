"""Save / restore the git side of a pipeline run (dvc.lock + uncached outputs) beside the DVC remote.

A Ray job's copy of the repository is thrown away when the job ends. `dvc push` keeps the cached
stage outputs in the remote, but dvc.lock and the outputs declared `cache: false` (metrics, plot
data) belong in git, so the next job (or you) could not tell what is up to date. This keeps them
in `<remote>/stm-state/<name>.tar.gz`, one archive per params file:

    python infra/pipeline_state.py save    <remote-url> <name>   # after `dvc repro` + `dvc push`
    python infra/pipeline_state.py restore <remote-url> <name>   # before `dvc pull` (next job, or you)

Only DVC-owned files travel (never code), so a restore cannot undo an edit made since.
The remote URL is any fsspec URL DVC can use (s3://, gs://, a local or mounted path).
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path

STATE_DIR = "stm-state"


def state_url(remote: str, name: str) -> str:
    if not name or "/" in name:
        raise ValueError(f"state name must be a plain file name, got {name!r}")
    return f"{remote.rstrip('/')}/{STATE_DIR}/{name}.tar.gz"


def dvc_owned_files(root: Path) -> list[str]:
    """dvc.lock and every `cache: false` output of every stage that exists, relative to root."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        paths = {os.path.relpath(out.fs_path, repo.root_dir)
                 for stage in repo.index.stages for out in stage.outs if not out.use_cache}
    paths.add("dvc.lock")
    return sorted(p for p in paths if (root / p).exists())


def save(remote: str, name: str, root: Path = Path(".")) -> list[str]:
    import fsspec

    files = dvc_owned_files(root)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in files:
            tar.add(root / path, arcname=path)
    fs, target = fsspec.core.url_to_fs(state_url(remote, name))
    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    fs.pipe_file(tmp, buffer.getvalue())
    fs.mv(tmp, target)  # readers see the old archive or the new one, never half of one
    return files


def restore(remote: str, name: str, root: Path = Path(".")) -> list[str]:
    import fsspec

    url = state_url(remote, name)
    fs, target = fsspec.core.url_to_fs(url)
    if not fs.exists(target):
        return []
    try:
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(target)), mode="r:gz") as tar:
            names = tar.getnames()
            tar.extractall(root, filter="data")  # no absolute paths, no `..`, no links out
    except (tarfile.TarError, OSError) as err:
        raise RuntimeError(f"{url}: not a readable pipeline state archive ({err})") from err
    return names


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("save", "restore"):
        print(__doc__, file=sys.stderr)
        return 2
    action, remote, name = argv
    files = save(remote, name) if action == "save" else restore(remote, name)
    verb = "saved" if action == "save" else "restored"
    print(f"pipeline_state: {verb} {len(files)} file(s) {'to' if action == 'save' else 'from'} "
          f"{state_url(remote, name)}: {' '.join(files) or '-'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
