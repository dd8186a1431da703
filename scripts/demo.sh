#!/usr/bin/env bash
# The main job on a fresh machine: installs what is missing, builds the release binaries,
# starts a local cluster (3 aggregators, 2 leaves) and runs the spec's statements against it.
# Leaves the cluster running; stop it with deploy/local/down.sh.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
bash scripts/setup.sh
bash deploy/local/up.sh
source deploy/local/common.sh

run() {
  echo
  echo "mysql> $1"
  MYSQL_PWD="${SHARDLINE_ROOT_PASSWORD:-}" mariadb -h127.0.0.1 -P"$MYSQL_PORT" -uroot --table -e "$1"
}
run 'SET GLOBAL experimental_features_config = "kafka_connect_enabled=true"'
run "SHOW VARIABLES LIKE 'experimental_features_config'"
run "SHOW AGGREGATORS"
run "SHOW LEAVES"
run "CREATE DATABASE IF NOT EXISTS demo"
run "SHOW PARTITIONS ON demo"
echo
echo "The cluster is still running: mariadb -h127.0.0.1 -P$MYSQL_PORT -uroot"
