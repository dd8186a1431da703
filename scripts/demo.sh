#!/usr/bin/env bash
# The main job on a fresh machine: installs what is missing, builds the release binaries,
# starts a local cluster (3 aggregators, 2 leaves, a Kinesis emulator), puts the spec's demo
# records into a Kinesis stream, runs the spec's pipeline and queries.
# Leaves the cluster running; stop it with deploy/local/down.sh.
# SKIP_UP=1 runs the same against a cluster already running (e.g. the docker-compose one):
#   SKIP_UP=1 MYSQL_PORT=3306 KINESIS_ENDPOINT=http://127.0.0.1:4567 bash scripts/demo.sh
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
bash scripts/setup.sh
[ "${SKIP_UP:-0}" = 1 ] || bash deploy/local/up.sh
source deploy/local/common.sh
[ -n "$KINESIS_ENDPOINT" ] || KINESIS_ENDPOINT="http://127.0.0.1:$KINESIS_PORT"
export AWS_ENDPOINT_URL_KINESIS="$KINESIS_ENDPOINT" AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}" \
  AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}" AWS_REGION="${AWS_REGION:-us-east-1}"

echo "== demo records into Kinesis stream kinesis-data-stream"
"$VENV/bin/python" scripts/demo_data.py kinesis-data-stream

sql() {
  echo
  echo "mysql> $1"
  MYSQL_PWD="${SHARDLINE_ROOT_PASSWORD:-}" mariadb -h127.0.0.1 -P"$MYSQL_PORT" -uroot --table -D demo -e "$1"
}
MYSQL_PWD="${SHARDLINE_ROOT_PASSWORD:-}" mariadb -h127.0.0.1 -P"$MYSQL_PORT" -uroot -e "CREATE DATABASE IF NOT EXISTS demo"
sql 'SET GLOBAL experimental_features_config = "kafka_connect_enabled=true"'
sql "SHOW VARIABLES LIKE 'experimental_features_config'"
sql "CREATE INFERRED PIPELINE IF NOT EXISTS kinesis_pipeline
AS LOAD DATA KAFKACONNECT 'kafka-connector'
CONFIG '{
  \"connector.class\": \"com.singlestore.kafka.connect.kinesis.KinesisSourceConnector\",
  \"aws.access.key.id\": \"<aws_access_key>\",
  \"aws.secret.access.key\": \"<aws_secret_key>\",
  \"aws.session.token\": \"<aws_session_token>\",
  \"kafka.topic\": \"kinesis-topic\",
  \"kinesis.stream\": \"kinesis-data-stream\",
  \"kinesis.region\": \"us-east-1\",
  \"tasks.max\": 4
}'
CREDENTIALS '{}'
FORMAT AVRO"
sql "START PIPELINE IF NOT RUNNING kinesis_pipeline"
echo
echo "== waiting for the records to load"
want=5  # the spec's records (a re-run adds 5 more)
for _ in $(seq 1 60); do
  progress=$(MYSQL_PWD="${SHARDLINE_ROOT_PASSWORD:-}" mariadb -h127.0.0.1 -P"$MYSQL_PORT" -uroot -D demo -N -e "SELECT (SELECT COUNT(*) FROM kinesis_pipeline), (SELECT COUNT(*) FROM information_schema.PIPELINES_BATCHES_SUMMARY WHERE PIPELINE_NAME = 'kinesis_pipeline')")
  n=${progress%%$'\t'*}
  echo "   rows loaded: $n, batches committed: ${progress##*$'\t'}"
  [ "$n" -ge "$want" ] && break
  sleep 0.5
done
sql "SELECT PIPELINE_NAME, STATE FROM information_schema.PIPELINES WHERE PIPELINE_NAME = 'kinesis_pipeline'"
sql "SELECT * FROM information_schema.PIPELINES_SOURCE_OFFSETS WHERE PIPELINE_NAME = 'kinesis_pipeline'"
sql "SELECT TASK_ID, COUNT(*) as offset_count FROM information_schema.PIPELINES_SOURCE_OFFSETS WHERE PIPELINE_NAME = 'kinesis_pipeline' GROUP BY TASK_ID"
sql "SELECT topic, JSON_EXTRACT_STRING(record, 'partitionKey') AS partition_key, JSON_EXTRACT_STRING(record, 'sequenceNumber') AS seq_no, JSON_EXTRACT_STRING(record, 'shardId') AS shard_id FROM kinesis_pipeline"
sql "SELECT * FROM kinesis_pipeline WHERE JSON_EXTRACT_STRING(record, 'partitionKey') = 'user-c'"
sql "SELECT topic, JSON_EXTRACT_STRING(id, 'partitionKey') AS id_partition_key, JSON_EXTRACT_BIGINT(FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')), 'seq') AS seq, JSON_EXTRACT_STRING(FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')), 'msg') AS msg FROM kinesis_pipeline ORDER BY seq"
echo
echo "The cluster is still running: mariadb -h127.0.0.1 -P$MYSQL_PORT -uroot -D demo"
