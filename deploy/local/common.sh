# Shared settings of the local-cluster scripts. Sourced, not run.
# Every setting can be overridden from the environment.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
AGGREGATORS="${AGGREGATORS:-3}"
LEAVES="${LEAVES:-2}"
DATA_DIR="${DATA_DIR:-$REPO_ROOT/.shardline}"
MYSQL_PORT="${MYSQL_PORT:-3306}"
AGG_GRPC_PORT="${AGG_GRPC_PORT:-7101}"   # aggregator i listens on AGG_GRPC_PORT+i-1
LEAF_PORT="${LEAF_PORT:-7201}"           # leaf i listens on LEAF_PORT+i-1
METRICS_PORT="${METRICS_PORT:-}"         # if set: Prometheus /metrics of aggregator i at
                                         # METRICS_PORT+i-1, of leaf i at METRICS_PORT+AGGREGATORS+i-1
PROFILE="${PROFILE:-release}"            # cargo profile built when BIN_DIR is not given
BIN_DIR="${BIN_DIR:-}"
READY_TIMEOUT="${READY_TIMEOUT:-90}"
KINESIS_PORT="${KINESIS_PORT:-4567}"       # the local Kinesis emulator
KINESIS_EMULATOR="${KINESIS_EMULATOR:-sim}" # sim (our kinesis-sim) or moto (moto_server)
KINESIS_ENDPOINT="${KINESIS_ENDPOINT:-}"  # set to use another Kinesis endpoint instead
VENV="${VENV:-$REPO_ROOT/.venv}"
PID_DIR="$DATA_DIR/pids"
LOG_DIR="$DATA_DIR/logs"

pid_alive() { # pidfile
  # Alive and not a zombie: where nothing reaps orphans (some container and VM inits do not),
  # a killed node stays a zombie that `kill -0` still finds.
  [ -f "$1" ] || return 1
  local pid state
  pid="$(cat "$1")"
  kill -0 "$pid" 2>/dev/null || return 1
  state="$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)"
  [ "$state" != "Z" ]
}

mysql_q() { # port sql...
  local port="$1"; shift
  MYSQL_PWD="${SHARDLINE_ROOT_PASSWORD:-}" mariadb -h127.0.0.1 -P"$port" -uroot --batch --skip-column-names \
    --connect-timeout=2 -e "$*" 2>/dev/null
}
