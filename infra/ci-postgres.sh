#!/usr/bin/env bash
# PostgreSQL's server programs for the tests (tests/test_mlflow_postgres.py starts a throw-away
# server from them): Debian's package, installed when initdb and pg_ctl are not there yet.
#
#   bash infra/ci-postgres.sh      # prints the folder holding initdb and pg_ctl
set -euo pipefail

find_bin() {
  if command -v initdb > /dev/null && command -v pg_ctl > /dev/null; then
    dirname "$(readlink -f "$(command -v initdb)")"
    return 0
  fi
  for dir in /usr/lib/postgresql/*/bin; do
    [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]] && { echo "$dir"; return 0; }
  done
  return 1
}

if ! find_bin; then
  if [[ "$(id -u)" != 0 ]]; then
    echo "ci-postgres.sh: PostgreSQL is not installed and this is not root: apt-get install -y postgresql" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -q > /dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql > /dev/null
  find_bin
fi
