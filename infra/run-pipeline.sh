#!/usr/bin/env bash
# Run the whole DVC pipeline as one Ray job, with stage outputs kept in shared storage.
#
#   ray job submit --address http://<head>:8265 --working-dir . -- bash infra/run-pipeline.sh params-paper.yaml
#
# Inside a Ray job RAY_ADDRESS is set, so every stage (`stm ...`, run by `dvc repro`) joins the
# cluster instead of starting a local Ray. The job's working directory is a copy of the repo
# *without* git-ignored files (data/, models/, results/ ...), and it is thrown away when the job
# ends. So stage outputs travel through the DVC remote in STM_DVC_REMOTE (s3://, gs://, a shared
# mount): the job restores the previous run's dvc.lock and uncached outputs (metrics, plot data:
# infra/pipeline_state.py keeps them beside the remote), pulls the cached outputs, runs
# `dvc repro` (only what changed re-runs), pushes the outputs and saves the new state. On your
# machine, the same restore + `dvc pull` gives you the run's results and the dvc.lock to commit:
#
#   python infra/pipeline_state.py restore "$STM_DVC_REMOTE" params-paper && dvc pull
#
# Arguments / environment:
#   $1 or STM_PARAMS   params file to run with (default params.yaml); another file, e.g. the
#                      paper recipe, is copied over params.yaml in this job's copy of the repo
#   STM_STORAGE_ROOT   the store every node reaches (s3://, gs://, file:// on a shared mount): the
#                      stages keep what crosses nodes there (storage.root in params wins)
#   STM_DVC_REMOTE     DVC remote URL for stage outputs (default: $STM_STORAGE_ROOT/dvc; without
#                      either nothing is pulled or pushed, and outputs stay in the job's directory)
#   STM_DVC_TARGETS    stages to reproduce (default: all)
#   MLFLOW_TRACKING_URI the cluster's MLflow server (infra/mlflow/start-server.sh)
set -euo pipefail

params="${1:-${STM_PARAMS:-params.yaml}}"
[[ -f dvc.yaml ]] || { echo "run-pipeline.sh: no dvc.yaml in $(pwd): run from the repository root" >&2; exit 2; }
[[ -f "$params" ]] || { echo "run-pipeline.sh: params file '$params' not found in $(pwd)" >&2; exit 2; }
if [[ "$params" != "params.yaml" ]]; then
  cp "$params" params.yaml  # DVC tracks params.yaml; this is the job's own copy of the repo
fi
# The working-dir upload keeps .git; an image or archive without it still needs a git repo for DVC.
[[ -d .git ]] || git init -q

if [[ -z "${STM_DVC_REMOTE:-}" && -n "${STM_STORAGE_ROOT:-}" ]]; then
  export STM_DVC_REMOTE="${STM_STORAGE_ROOT%/}/dvc"
fi
state="$(basename "$params" .yaml)"  # one saved state per params file
echo "run-pipeline.sh: params=$params RAY_ADDRESS=${RAY_ADDRESS:-<local>} STM_STORAGE_ROOT=${STM_STORAGE_ROOT:-<local>} MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-<local sqlite>}" >&2
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -n "${STM_DVC_REMOTE:-}" ]]; then
  dvc remote add --local --force --default shared "$STM_DVC_REMOTE"
  python "$here/pipeline_state.py" restore "$STM_DVC_REMOTE" "$state"
  dvc pull --allow-missing
fi
# shellcheck disable=SC2086  # targets are word-split on purpose
dvc repro ${STM_DVC_TARGETS:-}
if [[ -n "${STM_DVC_REMOTE:-}" ]]; then
  dvc push
  python "$here/pipeline_state.py" save "$STM_DVC_REMOTE" "$state"
fi
dvc metrics show
