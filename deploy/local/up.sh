#!/usr/bin/env bash
# Starts (or completes) a local Shardline cluster: AGGREGATORS aggregators and LEAVES leaves as
# background processes, data under DATA_DIR, the first aggregator's MySQL port at MYSQL_PORT.
# Nodes already running (by PID file) are left alone, so running it again brings back
# killed nodes; after down.sh it restarts the same cluster with its data.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if ! command -v mariadb >/dev/null 2>&1; then
  echo "up.sh: the mariadb client is needed (apt-get install mariadb-client)" >&2
  exit 1
fi
if [ -z "$BIN_DIR" ]; then
  echo "== building aggregator and leaf ($PROFILE)"
  (cd "$REPO_ROOT" && cargo build --profile "$PROFILE" -p aggregator -p leaf -p kinesis-sim --bins)
  dir="$PROFILE"; [ "$PROFILE" = dev ] && dir=debug
  BIN_DIR="$REPO_ROOT/target/$dir"
fi
mkdir -p "$PID_DIR" "$LOG_DIR"

# Kinesis: our simulator (KINESIS_EMULATOR=sim, the default) or moto_server from the project's
# venv (KINESIS_EMULATOR=moto), unless KINESIS_ENDPOINT points elsewhere. Leaves reach it through
# the standard AWS variables, so the spec's CONFIG works verbatim.
if [ -z "$KINESIS_ENDPOINT" ]; then
  if ! pid_alive "$PID_DIR/kinesis.pid"; then
    case "$KINESIS_EMULATOR" in
      sim) emulator=("$BIN_DIR/kinesis-sim" --listen "127.0.0.1:$KINESIS_PORT" --data-dir "$DATA_DIR/kinesis") ;;
      moto)
        if [ ! -x "$VENV/bin/moto_server" ]; then
          echo "up.sh: $VENV/bin/moto_server not found; run scripts/setup.sh" >&2
          exit 1
        fi
        emulator=("$VENV/bin/moto_server" -H 127.0.0.1 -p "$KINESIS_PORT") ;;
      *) echo "up.sh: KINESIS_EMULATOR must be sim or moto, not '$KINESIS_EMULATOR'" >&2; exit 1 ;;
    esac
    nohup "${emulator[@]}" >>"$LOG_DIR/kinesis.log" 2>&1 &
    echo $! >"$PID_DIR/kinesis.pid"
    echo "   kinesis emulator ($KINESIS_EMULATOR) started on 127.0.0.1:$KINESIS_PORT (pid $!)"
  fi
  KINESIS_ENDPOINT="http://127.0.0.1:$KINESIS_PORT"
  for _ in $(seq 1 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$KINESIS_PORT") 2>/dev/null && break
    sleep 0.1
  done
fi
export AWS_ENDPOINT_URL_KINESIS="$KINESIS_ENDPOINT"
export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
export AWS_REGION="${AWS_REGION:-us-east-1}"

peers=""
agg_grpc=""
for i in $(seq 1 "$AGGREGATORS"); do
  peers+="${peers:+,}$i=127.0.0.1:$((AGG_GRPC_PORT + i - 1))"
  agg_grpc+="${agg_grpc:+,}127.0.0.1:$((AGG_GRPC_PORT + i - 1))"
done

start() { # name pidfile cmd...
  local name="$1" pidfile="$2"; shift 2
  if pid_alive "$pidfile"; then
    echo "   $name already running (pid $(cat "$pidfile"))"
    return
  fi
  nohup "$@" >>"$LOG_DIR/$name.log" 2>&1 &
  echo $! >"$pidfile"
  echo "   $name started (pid $!, log $LOG_DIR/$name.log)"
}

echo "== starting $AGGREGATORS aggregator(s) and $LEAVES leaf/leaves under $DATA_DIR"
metrics() { # port offset: the --metrics-listen flag when METRICS_PORT is set
  if [ -n "$METRICS_PORT" ]; then
    echo "--metrics-listen=127.0.0.1:$((METRICS_PORT + $1))"
  fi
}
for i in $(seq 1 "$AGGREGATORS"); do
  # shellcheck disable=SC2046 # metrics prints one word or none
  start "aggregator-$i" "$PID_DIR/aggregator-$i.pid" "$BIN_DIR/aggregator" \
    --node-id "$i" --peers "$peers" \
    --grpc-listen "127.0.0.1:$((AGG_GRPC_PORT + i - 1))" \
    --mysql-listen "127.0.0.1:$((MYSQL_PORT + i - 1))" \
    --data-dir "$DATA_DIR/aggregator-$i" $(metrics $((i - 1)))
done
for i in $(seq 1 "$LEAVES"); do
  # shellcheck disable=SC2046
  start "leaf-$i" "$PID_DIR/leaf-$i.pid" "$BIN_DIR/leaf" \
    --listen "127.0.0.1:$((LEAF_PORT + i - 1))" \
    --aggregators "$agg_grpc" \
    --data-dir "$DATA_DIR/leaf-$i" $(metrics $((AGGREGATORS + i - 1)))
done

echo "== waiting for a master aggregator and $LEAVES online leaves"
deadline=$((SECONDS + READY_TIMEOUT))
while :; do
  masters=$(mysql_q "$MYSQL_PORT" "SHOW AGGREGATORS" | awk -F'\t' '$6 == 1' | wc -l || true)
  online=$(mysql_q "$MYSQL_PORT" "SHOW LEAVES" | awk -F'\t' '$6 == "online"' | wc -l || true)
  if [ "$masters" = 1 ] && [ "$online" -ge "$LEAVES" ]; then
    break
  fi
  if [ $SECONDS -ge $deadline ]; then
    echo "up.sh: cluster not ready after ${READY_TIMEOUT}s (masters=$masters, online leaves=$online); see $LOG_DIR" >&2
    exit 1
  fi
  sleep 0.5
done
mysql_q "$MYSQL_PORT" "SHOW AGGREGATORS" | awk -F'\t' '{printf "   aggregator %s at %s:%s %s%s\n", $7, $1, $2, $3, ($6==1?" (master)":"")}'
mysql_q "$MYSQL_PORT" "SHOW LEAVES" | awk -F'\t' '{printf "   leaf %s at %s:%s %s\n", $7, $1, $2, $6}'
echo "   kinesis endpoint for leaves: $KINESIS_ENDPOINT"
echo "== ready. Connect with:"
echo "   mariadb -h127.0.0.1 -P$MYSQL_PORT -uroot"
echo "   stop with deploy/local/down.sh; kill one node with: kill -9 \$(cat $PID_DIR/leaf-1.pid)"
