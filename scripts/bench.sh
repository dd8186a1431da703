#!/usr/bin/env bash
# The benchmark command (issue 6): installs what is missing, builds the release binaries (unless
# BIN_DIR names prebuilt ones) and runs scripts/bench.py, which starts its own clusters and prints
# one line per figure next to its ceiling and target. Arguments go to bench.py (see its --help).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# A BIN_DIR given relative to the caller's directory still means that directory after the cd.
if [ -n "${BIN_DIR:-}" ]; then
  BIN_DIR="$(realpath -m "$BIN_DIR")"
fi
cd "$REPO_ROOT"

bash scripts/setup.sh
if [ -z "${BIN_DIR:-}" ]; then
  echo "== cargo build --release (nodes, kinesis-sim and the ceiling tools)"
  cargo build --release --locked -p aggregator -p leaf -p kinesis-sim -p bench --bins
fi
exec .venv/bin/python scripts/bench.py --bin-dir "${BIN_DIR:-target/release}" "$@"
