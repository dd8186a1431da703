"""The docker-compose cluster (deploy/docker-compose.yml) from the image deploy/docker/build.sh
makes: it comes up healthy, runs the spec's pipeline from the Kinesis simulator container, and
loads every record exactly once while `docker kill` takes a leaf down mid-ingest."""
import os
import random
import shutil
import subprocess
import threading
import time

import boto3
import pymysql
import pytest

from conftest import REPO, _free_base

COMPOSE_FILE = REPO / "deploy/docker-compose.yml"
IMAGE = os.environ.get("SHARDLINE_IMAGE", "shardline:latest")
STREAM = "compose-stream"


def _compose_cmd():
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


class Compose:
    def __init__(self):
        self.project = f"shardline-test-{os.getpid()}"
        base = _free_base(4)
        self.mysql_ports = [base, base + 1, base + 2]
        self.kinesis_port = base + 3
        self.env = {
            **os.environ,
            "SHARDLINE_IMAGE": IMAGE,
            "SHARDLINE_MYSQL_PORT_1": str(base),
            "SHARDLINE_MYSQL_PORT_2": str(base + 1),
            "SHARDLINE_MYSQL_PORT_3": str(base + 2),
            "SHARDLINE_KINESIS_PORT": str(base + 3),
            "SHARDLINE_LEAF_HEARTBEAT_TIMEOUT_MS": "1500",
        }

    def run(self, *args, check=True, timeout=300):
        return subprocess.run(
            _compose_cmd() + ["-p", self.project, "-f", str(COMPOSE_FILE), *args],
            env=self.env, capture_output=True, text=True, timeout=timeout, check=check,
        )

    def container(self, service):
        return self.run("ps", "-q", service).stdout.strip()

    def sql(self, sql, i=0, db=None):
        conn = pymysql.connect(host="127.0.0.1", port=self.mysql_ports[i], user="root",
                               password="", database=db, autocommit=True, connect_timeout=5,
                               read_timeout=60)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            conn.close()


def wait(what, timeout, fn):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            got = fn()
            if got:
                return got
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


@pytest.fixture(scope="module")
def compose():
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        env = dict(os.environ)
        if os.environ.get("SHARDLINE_BIN_DIR"):
            env["BIN_DIR"] = os.environ["SHARDLINE_BIN_DIR"]
        subprocess.run(["bash", str(REPO / "deploy/docker/build.sh")], env=env, check=True,
                       timeout=1800)
    c = Compose()
    c.run("up", "-d")
    try:
        yield c
    finally:
        logs = c.run("logs", "--no-color", "--tail", "30", check=False).stdout
        c.run("down", "-v", "--remove-orphans", check=False)
        print(logs[-20000:])


def master(c):
    for row in c.sql("SHOW AGGREGATORS"):
        if str(row[5]) == "1":
            return row
    return None


def test_compose_cluster_is_healthy_and_loads_exactly_once_through_a_leaf_kill(compose):
    c = compose
    wait("a master", 90, lambda: master(c))
    wait("3 online leaves", 90,
         lambda: sum(1 for r in c.sql("SHOW LEAVES") if r[5] == "online") == 3)
    # Every container reports healthy (the image's gRPC health check, the simulator's port).
    services = ["aggregator-1", "aggregator-2", "aggregator-3", "leaf-1", "leaf-2", "leaf-3",
                "kinesis"]

    def healthy():
        ids = [c.container(s) for s in services]
        out = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", *ids],
                             capture_output=True, text=True, check=True).stdout.split()
        return out == ["healthy"] * len(services)
    wait("every container healthy", 90, healthy)
    # Readiness (the Kubernetes readiness probe's service): an aggregator that knows the master,
    # a leaf that reaches it.
    for service in ["aggregator-2", "leaf-3"]:
        out = subprocess.run(["docker", "exec", c.container(service),
                              "/usr/local/bin/shardline-health", "--ready"],
                             capture_output=True, text=True)
        assert out.returncode == 0 and "SERVING" in out.stdout, (service, out)

    k = boto3.client("kinesis", endpoint_url=f"http://127.0.0.1:{c.kinesis_port}",
                     region_name="us-east-1", aws_access_key_id="test",
                     aws_secret_access_key="test")
    k.create_stream(StreamName=STREAM, ShardCount=3)
    wait("stream ACTIVE", 30, lambda: k.describe_stream_summary(StreamName=STREAM)
         ["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE")
    c.sql('SET GLOBAL experimental_features_config = "kafka_connect_enabled=true"')
    c.sql("SET GLOBAL pipelines_extractor_max_batch_interval_ms = 200")
    c.sql("CREATE DATABASE compose_db")
    config = ('{"connector.class": "com.singlestore.kafka.connect.kinesis.KinesisSourceConnector",'
              ' "aws.access.key.id": "test", "aws.secret.access.key": "test",'
              ' "kafka.topic": "kinesis-topic", "kinesis.stream": "' + STREAM + '",'
              ' "kinesis.region": "us-east-1", "tasks.max": 3}')
    c.sql("CREATE INFERRED PIPELINE kinesis_pipe AS LOAD DATA KAFKACONNECT 'kafka-connector' "
          f"CONFIG '{config}' CREDENTIALS '{{}}' FORMAT AVRO", db="compose_db")
    c.sql("START PIPELINE kinesis_pipe", db="compose_db")

    put = []
    stop = threading.Event()
    errors = []

    def produce():
        n = 0
        try:
            while not stop.is_set():
                pending = [{"Data": f'{{"n":{n + i}}}'.encode(),
                            "PartitionKey": f"key-{random.getrandbits(32)}"} for i in range(50)]
                n += len(pending)
                while pending:
                    r = k.put_records(StreamName=STREAM, Records=pending)
                    retry = []
                    for rec, res in zip(pending, r["Records"]):
                        if "SequenceNumber" in res:
                            put.append((res["ShardId"], res["SequenceNumber"]))
                        else:
                            retry.append(rec)
                    pending = retry
                    if pending:
                        time.sleep(0.1)
                time.sleep(0.05)
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    wait("rows arriving", 60, lambda: c.sql("SELECT COUNT(*) FROM kinesis_pipe",
                                            db="compose_db")[0][0] > 0)
    victim = c.container("leaf-2")
    subprocess.run(["docker", "kill", victim], check=True, capture_output=True)
    killed_at = time.time()
    # Its tasks move to the other leaves; then it comes back.
    wait("leaf-2 offline", 30,
         lambda: any(r[5] == "offline" for r in c.sql("SHOW LEAVES")))
    time.sleep(2)
    c.run("start", "leaf-2")
    wait("3 online leaves again", 60,
         lambda: sum(1 for r in c.sql("SHOW LEAVES") if r[5] == "online") == 3)
    time.sleep(3)
    stop.set()
    producer.join(60)
    assert not errors, errors
    print(f"compose: {len(put)} records put; leaf-2 down {time.time() - killed_at:.1f} s")
    wait(f"{len(put)} rows", 120, lambda: c.sql("SELECT COUNT(*) FROM kinesis_pipe",
                                                db="compose_db")[0][0] >= len(put))
    time.sleep(2)
    rows = c.sql("SELECT JSON_EXTRACT_STRING(record, 'shardId'), "
                 "JSON_EXTRACT_STRING(record, 'sequenceNumber') FROM kinesis_pipe",
                 db="compose_db")
    loaded = [tuple(r) for r in rows]
    duplicates = len(loaded) - len(set(loaded))
    missing = len(set(put) - set(loaded))
    extra = len(set(loaded) - set(put))
    print(f"compose: rows {len(loaded)} duplicates {duplicates} missing {missing} extra {extra}")
    assert (duplicates, missing, extra) == (0, 0, 0)
    last = {}
    for shard, seq in put:
        if int(seq) > int(last.get(shard, "0")):
            last[shard] = seq
    offsets = dict(c.sql(
        "SELECT JSON_EXTRACT_STRING(`KEY`, 'shardId'), JSON_EXTRACT_STRING(`VALUE`, "
        "'sequenceNumber') FROM information_schema.PIPELINES_SOURCE_OFFSETS "
        "WHERE PIPELINE_NAME = 'kinesis_pipe'"))
    assert offsets == last
    assert c.sql("SELECT STATE FROM information_schema.PIPELINES "
                 "WHERE PIPELINE_NAME = 'kinesis_pipe'") == (("Running",),)
