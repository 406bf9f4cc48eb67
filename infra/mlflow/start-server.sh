#!/usr/bin/env bash
# Start the one MLflow tracking server that every node of a cluster logs to.
#
#   MLFLOW_BACKEND_STORE_URI=postgresql://user:pass@db:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/stm-vos/mlflow \
#   infra/mlflow/start-server.sh
#
# Then point every client at it:  export MLFLOW_TRACKING_URI=http://<this host>:5000
#
# Environment (all optional):
#   MLFLOW_BACKEND_STORE_URI      runs, params, metrics: a SQLAlchemy URI (postgresql://, mysql://,
#                                 sqlite:////abs/path.db); default sqlite in $MLFLOW_DATA_DIR
#   MLFLOW_ARTIFACTS_DESTINATION  where the server stores artifacts (s3://, gs://, a path); default
#                                 $MLFLOW_DATA_DIR/artifacts. Clients upload through the server
#                                 (--serve-artifacts), so workers need no bucket credentials.
#   MLFLOW_DATA_DIR               local directory for the defaults above (default ~/mlflow-server)
#   MLFLOW_HOST / MLFLOW_PORT     bind address and port (default 0.0.0.0:5000)
#   MLFLOW_WORKERS                server worker processes (default 2)
#   MLFLOW_ALLOWED_HOSTS          Host headers to accept (default: MLflow's own, localhost and
#                                 private IPs; set it when clients use a DNS name such as a k8s Service)
#   MLFLOW_EXTRA_ARGS             extra `mlflow server` options, word-split
#   MLFLOW_AUTH                   basic-auth (default): MLflow's basic-auth app, every request needs a
#                                 user; none: no authentication (a trusted network only)
#   MLFLOW_AUTH_ADMIN_PASSWORD    the admin's password, set on the first start (from a secret, never
#                                 in git); clients send MLFLOW_TRACKING_USERNAME / _PASSWORD
#   MLFLOW_AUTH_ADMIN_USERNAME    default admin
#   MLFLOW_AUTH_DATABASE_URI      the users' database (default: MLFLOW_BACKEND_STORE_URI, one Postgres)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key shared by the workers (default: generated, kept in $MLFLOW_DATA_DIR)
#
#   MLFLOW_REQUIRE_DATABASE       1: refuse a sqlite (or missing) backend store: clusters keep runs in
#                                 PostgreSQL, off the head, so they outlive `ray down` and take replicas
#
# The server runs in the foreground (a container's main process); background it with nohup
# on a VM, after `--check`, which validates the settings and says what is wrong (a backgrounded
# server's refusal only reaches its log). `--dry-run` prints the command without starting anything.
set -euo pipefail

data_dir="${MLFLOW_DATA_DIR:-$HOME/mlflow-server}"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///${data_dir}/mlflow.db}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-${data_dir}/artifacts}"
host="${MLFLOW_HOST:-0.0.0.0}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-2}"

case "$backend" in
  *://*) ;;
  *) echo "start-server.sh: MLFLOW_BACKEND_STORE_URI='$backend' is not a URI (e.g. sqlite:////abs/mlflow.db, postgresql://...)" >&2
     exit 2 ;;
esac
if [[ "${MLFLOW_REQUIRE_DATABASE:-0}" == "1" && "$backend" != postgresql* ]]; then
  echo "start-server.sh: MLFLOW_REQUIRE_DATABASE=1 but the backend store is '${backend%%://*}://...': set MLFLOW_BACKEND_STORE_URI=postgresql://USER:PASSWORD@HOST:5432/DB (from the cluster's secret)" >&2
  exit 2
fi

cmd=(mlflow server
     --backend-store-uri "$backend"
     --artifacts-destination "$artifacts"
     --serve-artifacts
     --host "$host"
     --port "$port"
     --workers "$workers")
# The auth config holds no password: MLflow reads MLFLOW_AUTH_ADMIN_PASSWORD from the environment.
write_auth_config() {
  mkdir -p "$data_dir"
  auth_ini="$data_dir/basic_auth.ini"
  umask 077
  cat > "$auth_ini.tmp" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-NO_PERMISSIONS}
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-$backend}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
  mv "$auth_ini.tmp" "$auth_ini"
  export MLFLOW_AUTH_CONFIG_PATH="$auth_ini"
  if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
    [[ -s "$data_dir/flask_secret" ]] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$data_dir/flask_secret"
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$data_dir/flask_secret")"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
}
auth="${MLFLOW_AUTH:-basic-auth}"
case "$auth" in
  basic-auth)
    if [[ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" && "${1:-}" != "--dry-run" ]]; then
      echo "start-server.sh: MLFLOW_AUTH_ADMIN_PASSWORD is not set (the basic-auth admin's password, from the cluster's secret; or MLFLOW_AUTH=none); not starting" >&2
      exit 2
    fi
    [[ "${1:-}" == "--dry-run" || "${1:-}" == "--check" ]] || write_auth_config
    cmd+=(--app-name basic-auth) ;;
  none) ;;
  *) echo "start-server.sh: MLFLOW_AUTH='$auth' (expected basic-auth or none)" >&2; exit 2 ;;
esac
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  cmd+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
if [[ -n "${MLFLOW_EXTRA_ARGS:-}" ]]; then
  read -r -a extra <<< "$MLFLOW_EXTRA_ARGS"
  cmd+=("${extra[@]}")
fi

if [[ "${1:-}" == "--dry-run" ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
  echo "start-server.sh: settings fine (backend ${backend%%://*}, auth $auth)" >&2
  exit 0
fi
# Local stores need their directories; remote ones (postgresql://, s3://) are the operator's.
case "$backend" in sqlite:///*) mkdir -p "$(dirname "${backend#sqlite:///}")" ;; esac
case "$artifacts" in *://*) ;; *) mkdir -p "$artifacts" ;; esac
echo "start-server.sh: backend=$backend artifacts=$artifacts listening on $host:$port" >&2
exec "${cmd[@]}"
