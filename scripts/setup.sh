#!/usr/bin/env bash
# Installs what Shardline's scripts and tests need on a fresh Debian machine, idempotently:
# the mariadb client (apt) and a Python venv at .venv with the test clients (pip).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

need_apt=()
command -v mariadb >/dev/null 2>&1 || need_apt+=(mariadb-client)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3 python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

VENV="$REPO_ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating Python venv at $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import pymysql, pytest, moto, boto3, flask, kubernetes_validate" 2>/dev/null; then
  echo "== pip install (test clients)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REPO_ROOT/scripts/requirements.txt"
fi
