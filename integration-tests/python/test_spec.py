"""The spec's statements and queries, verbatim, from pymysql against a cluster from up.sh
(Kinesis: the cluster's emulator), compared with the spec's outputs (column names, values;
sequence numbers and arrival times differ by nature and are checked for shape)."""
import json
import os
import time

import boto3
import pymysql
import pytest

SPEC_RECORDS = [(1, "first", "user-a"), (2, "second", "user-b"), (3, "third", "user-a"),
                (4, "fourth", "user-c"), (5, "fifth", "user-b")]

CREATE = """CREATE INFERRED PIPELINE kinesis_pipeline 
AS LOAD DATA KAFKACONNECT 'kafka-connector'
CONFIG '{
  "connector.class": "com.singlestore.kafka.connect.kinesis.KinesisSourceConnector",
  "aws.access.key.id": "<aws_access_key>",
  "aws.secret.access.key": "<aws_secret_key>",
  "aws.session.token": "<aws_session_token>",
  "kafka.topic": "kinesis-topic",
  "kinesis.stream": "kinesis-data-stream",
  "kinesis.region": "us-east-1",
  "tasks.max": 4
}'
CREDENTIALS '{}' -- AWS credentials are in CONFIG for Kinesis connector
FORMAT AVRO;"""

Q_FIELDS = """SELECT
 topic,
 JSON_EXTRACT_STRING(record, 'partitionKey') AS partition_key,
 JSON_EXTRACT_STRING(record, 'sequenceNumber') AS seq_no,
 JSON_EXTRACT_STRING(record, 'shardId') AS shard_id
FROM kinesis_pipeline;"""

Q_FILTER = """SELECT *
FROM kinesis_pipeline
WHERE JSON_EXTRACT_STRING(record, 'partitionKey') = 'user-c';"""

Q_MULTI = """SELECT
  topic,

  -- id envelope
  JSON_EXTRACT_STRING(id, 'partitionKey') AS id_partition_key,

  -- outer record (Kinesis metadata)
  JSON_EXTRACT_STRING(record, 'partitionKey')     AS partition_key,
  JSON_EXTRACT_STRING(record, 'sequenceNumber') AS sequence_number,
  JSON_EXTRACT_STRING(record, 'shardId')        AS shard_id,
  JSON_EXTRACT_STRING(record, 'streamName')     AS stream_name,
  JSON_EXTRACT_BIGINT(record, 'approximateArrivalTimestamp') AS arrival_ts_ms,

  -- inner payload (decoded from record.data)
  JSON_EXTRACT_BIGINT(
    FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')),
    'seq'
  ) AS seq,
  JSON_EXTRACT_STRING(
    FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')),
    'msg'
  ) AS msg

FROM kinesis_pipeline;"""

ALTERS = ["""ALTER TABLE kinesis_pipeline ADD COLUMN partition_key
  AS JSON_EXTRACT_STRING(record, 'partitionKey') PERSISTED VARCHAR(128);""",
          """ALTER TABLE kinesis_pipeline ADD COLUMN seq
  AS JSON_EXTRACT_BIGINT(
    FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')),
    'seq'
  ) PERSISTED BIGINT;""",
          """ALTER TABLE kinesis_pipeline ADD COLUMN msg
  AS JSON_EXTRACT_STRING(
    FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')),
    'msg'
  ) PERSISTED VARCHAR(512);"""]

Q_COMPUTED = """SELECT topic, partition_key, seq, msg, record
FROM kinesis_pipeline
WHERE seq > 3
ORDER BY seq;"""


def run(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        names = [d[0] for d in cur.description] if cur.description else []
        return names, list(cur.fetchall())


def test_the_spec_verbatim(moto_cluster):
    cluster = moto_cluster
    k = boto3.client("kinesis", endpoint_url=f"http://127.0.0.1:{cluster.env['KINESIS_PORT']}",
                     region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
    k.create_stream(StreamName="kinesis-data-stream", ShardCount=1)
    time.sleep(0.3)
    for seq, msg, key in SPEC_RECORDS:
        k.put_record(StreamName="kinesis-data-stream", PartitionKey=key,
                     Data=json.dumps({"seq": seq, "msg": msg}, separators=(",", ":")).encode())
    conn = pymysql.connect(host="127.0.0.1", port=cluster.ports[0], user="root", password="", autocommit=True)
    run(conn, "CREATE DATABASE IF NOT EXISTS spec")
    run(conn, "USE spec")
    run(conn, 'SET GLOBAL experimental_features_config = "kafka_connect_enabled=true"')
    assert run(conn, "SHOW VARIABLES LIKE 'experimental_features_config'") == (
        ["Variable_name", "Value"], [("experimental_features_config", "kafka_connect_enabled=true")])
    run(conn, CREATE)
    run(conn, "START PIPELINE kinesis_pipeline;")
    for _ in range(100):
        if run(conn, "SELECT COUNT(*) FROM kinesis_pipeline")[1] == [(5,)]:
            break
        time.sleep(0.1)

    names, rows = run(conn, Q_FIELDS)
    last_seq = max((r[2] for r in rows), key=int)
    assert names == ["topic", "partition_key", "seq_no", "shard_id"]
    assert sorted((r[0], r[1], r[3]) for r in rows) == sorted(
        ("kinesis-topic", key, "shardId-000000000000") for _, _, key in SPEC_RECORDS)
    assert all(r[2].isdigit() for r in rows)

    names, rows = run(conn, Q_FILTER)
    assert names == ["topic", "id", "record"]
    assert len(rows) == 1
    topic, id_, record = rows[0]
    assert (topic, id_) == ("kinesis-topic", '{"partitionKey":"user-c"}')
    rec = json.loads(record)
    assert list(rec) == ["approximateArrivalTimestamp", "data", "partitionKey", "sequenceNumber", "shardId", "streamName"]
    assert rec["data"] == "eyJzZXEiOjQsIm1zZyI6ImZvdXJ0aCJ9"
    assert (rec["partitionKey"], rec["shardId"], rec["streamName"]) == ("user-c", "shardId-000000000000", "kinesis-data-stream")
    assert record == json.dumps(rec, separators=(",", ":")), "compact JSON, keys sorted"

    names, rows = run(conn, Q_MULTI)
    assert names == ["topic", "id_partition_key", "partition_key", "sequence_number", "shard_id",
                     "stream_name", "arrival_ts_ms", "seq", "msg"]
    assert sorted((r[1], r[2], r[5], r[7], r[8]) for r in rows) == sorted(
        (key, key, "kinesis-data-stream", seq, msg) for seq, msg, key in SPEC_RECORDS)
    assert all(isinstance(r[6], int) and r[6] > 1_700_000_000_000 for r in rows)

    for alter in ALTERS:
        run(conn, alter)
    names, rows = run(conn, Q_COMPUTED)
    assert names == ["topic", "partition_key", "seq", "msg", "record"]
    assert [r[:4] for r in rows] == [("kinesis-topic", "user-c", 4, "fourth"), ("kinesis-topic", "user-b", 5, "fifth")]
    assert json.loads(rows[1][4])["data"] == "eyJzZXEiOjUsIm1zZyI6ImZpZnRoIn0="

    names, rows = run(conn, "SELECT * FROM information_schema.PIPELINES_SOURCE_OFFSETS\nWHERE PIPELINE_NAME = 'kinesis_pipeline'")
    assert names == ["DATABASE_NAME", "PIPELINE_NAME", "BATCH_ID", "TASK_ID", "KEY", "VALUE"]
    assert [(r[0], r[1], r[3], r[4]) for r in rows] == [("spec", "kinesis_pipeline", 0, '{"shardId":"shardId-000000000000"}')]
    assert json.loads(rows[0][5]) == {"sequenceNumber": last_seq}

    names, rows = run(conn, "SELECT \n  PIPELINE_NAME,\n  STATE,\n  CONFIG_JSON\nFROM information_schema.PIPELINES\nWHERE PIPELINE_NAME = 'kinesis_pipeline'")
    assert names == ["PIPELINE_NAME", "STATE", "CONFIG_JSON"]
    assert rows[0][:2] == ("kinesis_pipeline", "Running")
    assert "<aws_secret_key>" not in rows[0][2]

    names, rows = run(conn, """-- Check task distribution
SELECT 
  TASK_ID,
  COUNT(*) as offset_count
FROM information_schema.PIPELINES_SOURCE_OFFSETS
WHERE PIPELINE_NAME = 'kinesis_pipeline'
GROUP BY TASK_ID;""")
    assert names == ["TASK_ID", "offset_count"]
    assert rows == [(0, 1)]

    run(conn, "SET GLOBAL pipelines_extractor_batch_size = 10000;")
    run(conn, "SET GLOBAL pipelines_extractor_max_batch_interval_ms = 1000;")
    run(conn, "CREATE INDEX idx_seq ON kinesis_pipeline(seq)")
    check_cli(cluster)
    assert [r[:4] for r in run(conn, Q_COMPUTED)[1]] == [("kinesis-topic", "user-c", 4, "fourth"), ("kinesis-topic", "user-b", 5, "fifth")]


def check_cli(cluster):
    """The mariadb CLI prints the spec's tables (values that differ by nature aside)."""
    out = cluster.mariadb("USE spec; " + Q_COMPUTED.replace("SELECT topic, partition_key, seq, msg, record", "SELECT topic, partition_key, seq, msg")).stdout
    assert out.splitlines() == [
        "+---------------+---------------+------+--------+",
        "| topic         | partition_key | seq  | msg    |",
        "+---------------+---------------+------+--------+",
        "| kinesis-topic | user-c        |    4 | fourth |",
        "| kinesis-topic | user-b        |    5 | fifth  |",
        "+---------------+---------------+------+--------+",
    ], out
    out = cluster.mariadb("SHOW VARIABLES LIKE 'experimental_features_config'").stdout
    assert out.splitlines() == [
        "+------------------------------+----------------------------+",
        "| Variable_name                | Value                      |",
        "+------------------------------+----------------------------+",
        "| experimental_features_config | kafka_connect_enabled=true |",
        "+------------------------------+----------------------------+",
    ], out
    out = cluster.mariadb("USE spec; " + Q_FILTER).stdout
    assert '| kinesis-topic | {"partitionKey":"user-c"} | {"approximateArrivalTimestamp":' in out, out
    assert '"data":"eyJzZXEiOjQsIm1zZyI6ImZvdXJ0aCJ9","partitionKey":"user-c","sequenceNumber":"' in out, out
    assert '","shardId":"shardId-000000000000","streamName":"kinesis-data-stream"} |' in out, out
