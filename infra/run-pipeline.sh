#!/usr/bin/env bash
# Run the DVC pipeline as one Ray job, pushing each stage to the DVC remote as soon as it ends.
#
#   ray job submit --address http://<head>:8265 --working-dir . -- bash infra/run-pipeline.sh params-paper.yaml
#
# Inside a Ray job RAY_ADDRESS is set, so every stage (`stm ...`, run by `dvc repro`) joins the
# cluster instead of starting a local Ray. The job's working directory is a copy of the repo
# *without* git-ignored files (data/, models/, results/ ...), thrown away when the job ends (a
# KubeRay RayJob deletes its whole cluster). So this script runs the stages one at a time, in
# dependency order, and after each one pushes its outputs and DVC's run cache to the remote
# `cluster` (.dvc/config). A failed or killed job loses at most the stage it was in: the next job
# (the same command again) pulls the run cache, and every stage that already ran with the same
# code, params and inputs is restored from the remote ("Stage '...' is cached - skipping run"),
# so it starts from the stage that failed. On your machine, the same gives you every output and
# the dvc.lock to commit, without training anything:
#
#   dvc remote default --local cluster && dvc repro --pull
#
# Arguments / environment:
#   $1 or STM_PARAMS   params file to run with (default params.yaml); another file, e.g. the
#                      paper recipe (an overlay of params.yaml), is written merged into
#                      params.yaml in this job's copy of the repo (`stm recipe`)
#   STM_STORAGE_ROOT   the store every node reaches (s3://, gs://, file:// on a shared mount): the
#                      stages keep what crosses nodes there (storage.root in params wins)
#   STM_DVC_REMOTE     the remote's URL for this job (s3://..., gs://..., a shared mount), instead
#                      of the `cluster` URL in .dvc/config (default: <storage.root or
#                      $STM_STORAGE_ROOT>/dvc, the store the stages use); set one
#                      on a cluster. With `none`, nothing is pulled or pushed (outputs stay in the
#                      job's directory).
#   STM_DVC_TARGETS    stages to reproduce, with what they depend on (default: all)
#   MLFLOW_TRACKING_URI the cluster's MLflow server (infra/mlflow/start-server.sh)
set -euo pipefail

params="${1:-${STM_PARAMS:-params.yaml}}"
[[ -f dvc.yaml ]] || { echo "run-pipeline.sh: no dvc.yaml in $(pwd): run from the repository root" >&2; exit 2; }
[[ -f "$params" ]] || { echo "run-pipeline.sh: params file '$params' not found in $(pwd)" >&2; exit 2; }
if [[ "$params" != "params.yaml" ]]; then
  # DVC tracks params.yaml; this is the job's own copy of the repo. An overlay (extends:) is merged
  # over its base; a full params file is copied as it is.
  if grep -q '^extends:' "$params"; then
    stm recipe "$params" --output params.yaml
  else
    cp "$params" params.yaml
  fi
fi
# Ray leaves .git out of the working-dir upload (as does an image without it); DVC needs a git repo.
[[ -d .git ]] || git init -q

remote="${STM_DVC_REMOTE:-}"
if [[ -z "$remote" ]]; then  # the same store as the stages: storage.root in params, else STM_STORAGE_ROOT
  root="$(python -c 'import yaml; p = yaml.safe_load(open("params.yaml")) or {}; print((p.get("storage") or {}).get("root") or "")')"
  root="${root:-${STM_STORAGE_ROOT:-}}"
  if [[ -n "$root" ]]; then
    remote="${root%/}/dvc"
    remote="${remote#file://}"  # DVC takes a shared mount as a plain path
  fi
fi
if [[ -n "$remote" && "$remote" != "none" ]]; then
  dvc remote add --local --force cluster "$remote"  # overrides the URL in .dvc/config for this job only
fi
if [[ "$remote" != "none" ]]; then
  url="$(dvc remote list | awk '$1 == "cluster" {print $2}')"
  [[ -n "$url" ]] || { echo "run-pipeline.sh: no DVC remote 'cluster' in .dvc/config and no STM_DVC_REMOTE" >&2; exit 2; }
  dvc remote default --local cluster  # what `dvc repro --pull` pulls from
fi
# The head keeps each dataset once: workspace outputs are hard links into DVC's cache, not copies
# (with download.keep_archives false in params-paper.yaml, no archive stays beside them either).
dvc config --local cache.type hardlink,copy
echo "run-pipeline.sh: params=$params remote=${url:-<none>} RAY_ADDRESS=${RAY_ADDRESS:-<local>}" \
     "STM_STORAGE_ROOT=${STM_STORAGE_ROOT:-<local>} MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-<local sqlite>}" >&2

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2086  # targets are word-split on purpose
mapfile -t stages < <(python "$here/dvc_stages.py" order ${STM_DVC_TARGETS:-})
[[ ${#stages[@]} -gt 0 ]] || { echo "run-pipeline.sh: no stages to run" >&2; exit 2; }
for stage in "${stages[@]}"; do
  echo "run-pipeline.sh: stage $stage" >&2
  if [[ "$remote" == "none" ]]; then
    dvc repro "$stage"
  else
    dvc repro --pull "$stage"  # a stage the run cache knows is restored from the remote, not re-run
    dvc push --run-cache "$stage"  # now: a later failure cannot lose this stage
    python "$here/dvc_stages.py" push-uncached "$stage"  # its metrics/plots, which the run cache restores too
  fi
done
dvc metrics show
