#!/usr/bin/env bash
# The test command: installs what is missing, builds the debug binaries once, builds the container
# image from them and validates the Kubernetes manifests, runs the Rust unit and integration tests
# (real processes, the CI chaos profile among them), then the Python tests (pymysql and the mariadb
# CLI against deploy/local/up.sh, Kinesis conformance, and the docker-compose cluster).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

bash scripts/setup.sh
echo "== cargo build (debug: binaries and tests)"
cargo build --workspace --bins --tests --locked
echo "== cargo fmt --check, clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== container image (debootstrap base, debug binaries) and Kubernetes manifests"
BIN_DIR="$REPO_ROOT/target/debug" bash deploy/docker/build.sh
bash deploy/k8s/validate.sh
echo "== cargo test (unit tests and the real-process tests, three at a time on this 2-core box)"
# One invocation over the whole workspace: the same features as the build, so nothing rebuilds.
# The storage tests (hundreds of MB through a query) run next, on their own: beside them the
# tests that time a failover would measure the machine's load.
cargo test --workspace --locked -- --test-threads 3 --skip queries::
echo "== cargo test: the storage tests (big tables, 1 MiB records)"
cargo test --workspace --locked --test it -- queries:: --test-threads 2
echo "== python client tests"
SHARDLINE_BIN_DIR="$REPO_ROOT/target/debug" "$REPO_ROOT/.venv/bin/python" -m pytest -q -rs integration-tests/python
