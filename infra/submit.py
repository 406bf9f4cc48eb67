"""The pipeline as one Ray job, started on the head by the cluster launcher's `ray submit`:

    ray submit infra/cluster-aws.yaml infra/submit.py -- params-paper.yaml

`ray submit` copies this file to the head's home and runs `python ~/submit.py ARGS` in the head's
container, whose image holds the project (`/home/ray/stm`). This submits there what
`ray job submit --working-dir . -- bash infra/run-pipeline.sh PARAMS` submits from a laptop (the
image's checkout as working directory, `run-pipeline.sh` as entry point) to the head's own jobs API,
follows its logs and exits with the job's outcome (0 when it succeeded). Standard library and Ray
only: it runs with the image's Python, outside the project's package.
"""

from __future__ import annotations

import argparse
import os
import sys

PROJECT = os.environ.get("STM_PROJECT", "/home/ray/stm")  # the image's checkout (infra/Dockerfile)
JOBS_API = os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="submit.py", description=__doc__.splitlines()[0])
    parser.add_argument("params", nargs="?", default="params.yaml",
                        help="params file in the project (default params.yaml; e.g. params-paper.yaml)")
    parser.add_argument("--no-wait", action="store_true", help="submit and exit; follow with `ray job logs`")
    return parser.parse_args(argv)


def entrypoint(params: str) -> str:
    """What `ray job submit ... -- bash infra/run-pipeline.sh PARAMS` runs."""
    return f"bash infra/run-pipeline.sh {params}"


def main(argv: list[str]) -> int:
    args = parse(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # the head's token (~/.ray/auth_token), as the nodes use
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(JOBS_API)
    job = client.submit_job(entrypoint=entrypoint(args.params), runtime_env={"working_dir": PROJECT})
    print(f"submit.py: job {job}: {entrypoint(args.params)} in {PROJECT} (ray job logs {job})", flush=True)
    if args.no_wait:
        return 0
    import asyncio

    async def follow() -> None:
        async for lines in client.tail_job_logs(job):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    status = client.get_job_status(job)
    print(f"submit.py: job {job} {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
