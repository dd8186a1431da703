#!/usr/bin/env bash
# Stops every node that up.sh started (SIGTERM, then SIGKILL after 10 s). Data is kept.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
shopt -s nullglob
for pidfile in "$PID_DIR"/*.pid; do
  name=$(basename "$pidfile" .pid)
  if pid_alive "$pidfile"; then
    kill -TERM "$(cat "$pidfile")" 2>/dev/null || true
  fi
done
for pidfile in "$PID_DIR"/*.pid; do
  name=$(basename "$pidfile" .pid)
  for _ in $(seq 1 100); do
    pid_alive "$pidfile" || break
    sleep 0.1
  done
  if pid_alive "$pidfile"; then
    echo "   $name did not stop in 10s; killing it"
    kill -KILL "$(cat "$pidfile")" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "   $name stopped"
done
