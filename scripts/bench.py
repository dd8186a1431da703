"""Shardline benchmarks (issue 6): each figure next to its ceiling, measured in the same run.

Usage:
    scripts/bench.sh [OPTIONS]                        # builds the release binaries, then runs this
    BIN_DIR=target/release scripts/bench.sh [OPTIONS] # prebuilt binaries, no cargo
    .venv/bin/python scripts/bench.py --bin-dir DIR [--only datagen,kinesis,latency,failover,query,raft]
        [--rows 1000000] [--kinesis-records 60000] [--kinesis-rounds 5] [--latency-samples 200]
        [--out figures.json]

Every scenario starts its own cluster with deploy/local/up.sh (fresh temporary data directory,
free ports) and stops it with down.sh, whatever happens. A figure is printed as one line:

    NAME   VALUE UNIT   ceiling(HOW) VALUE UNIT   ratio R   target T   ok|MISS

where the ceiling is the same work done by the simplest possible program on the same machine in
the same run, so the ratio says how much of the machine Shardline gets, not how fast the machine
is. Benchmarks are not tests: a missed target is printed, not failed. The exit status is 0 when
every selected scenario ran, 1 when one broke (the reason is printed; its cluster's data and
logs are kept). Progress goes to stderr, figures to stdout.

Figures:
  ingest.datagen            rows/s committed by a 2-task datagen pipeline (1 aggregator, 2 leaves,
                            batch size 10,000): --rows / wall time of START PIPELINE ... FOREGROUND.
                            Ceiling: bench-sled, a plain loop writing the same rows (32-byte
                            payload) into sled in row groups of 256 rows per entry, as the leaves
                            store them (the note adds the loop's rate with one entry per row).
                            Target: ratio >= 0.5.
  ingest.kinesis            records/s of a 4-task Kinesis pipeline (kinesis.record.limit 10,000, as the drain)
                            draining --kinesis-records records pre-loaded into a 4-shard
                            moto_server stream: from START PIPELINE (task assignment included)
                            until the rows the leaves loaded and made visible
                            (shardline_rows_loaded_total on their /metrics, polled every 20 ms)
                            reach them; COUNT(*) then checks, untimed, that the table holds
                            exactly them (a scan on every leaf is the query's cost, not the
                            ingest's). Ceiling:
                            bench-kinesis-drain, a plain GetRecords loop (10,000 records per call,
                            its fastest) with the same Rust SDK against the same stream: the mean
                            of the drains just before and just after the pipeline (drains and
                            pipelines alternate, --kinesis-rounds pipelines, a new one each time).
                            The figure is the round with the median ratio, all ratios in its
                            note. Target: ratio >= 0.9.
  ingest.kinesis.first_batch  START PIPELINE until the first rows were loaded, in that round: the
                            fixed cost (planning, assignment, ListShards, first reads) inside it.
  latency.p50, latency.p99  ms from a PutRecord's acknowledgement until the record is visible to
                            SELECT (kinesis-sim --no-limits, 2 shards, one record at a time, polled
                            every 5 ms). Target: p99 <= pipelines_extractor_max_batch_interval_ms
                            (set to 200) + 250 ms.
  latency.poll_query        median time of the polling query alone: part of every sample above.
  failover.leaf_kill.*      3 aggregators, 3 leaves, kinesis-sim with AWS's limits, 4 shards, a
                            producer putting ~500 records/s. SIGKILL a leaf running a task (from
                            the leaves' logs); `offline` is when the master marks it offline
                            (heartbeat timeout, 2 s by default), `resume` when every shard's
                            committed offset has moved past its value at the kill.
                            Target: resume <= 3 s.
  failover.master_kill.*    then SIGKILL the master aggregator; `new_master` is when a survivor names a
                            new master, `resume` when that has happened and every shard's committed
                            offset has moved on. Target: resume <= 3 s.
  query.*                   on the datagen table: COUNT(*) WHERE JSON_EXTRACT_BIGINT(record,'seq')
                            = point / > range (the reference), then the same on a PERSISTED computed
                            column `seq` with an index. Best of 3 runs (median in the note); the
                            ratio is the speed-up. Also the ALTER TABLE and CREATE INDEX times.
  raft.commits              batch commits/s through a 3-aggregator group (no leaves): bench-raft
                            stands in for a leaf and commits batches for 64 tasks at once for
                            10 s, each a Raft entry replicated and fsynced, sending them as a
                            leaf does (the batches waiting go together in one CommitBatches call,
                            4 calls in flight). Target >= 5,000/s. The reference
                            (raft.commits.call_per_batch, its own cluster, measured first) sends
                            one call per batch, 64 in flight.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import boto3
import botocore.config
import pymysql

import ports  # scripts/ports.py (this script's directory is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("datagen", "storage", "query", "kinesis", "latency", "failover", "raft")

# Pipeline settings every cluster gets (those of the integration tests).
MAX_BATCH_INTERVAL_MS = 200  # pipelines_extractor_max_batch_interval_ms
BATCH_INTERVAL_MS = 100  # pipelines_batch_interval: the wait after a batch that found nothing
INGEST_BATCH_SIZE = 10_000  # pipelines_extractor_batch_size for the throughput scenarios
KINESIS_RECORD_LIMIT = 10_000  # the pipeline's records per GetRecords: the drain's (the connector's default is 500)
DRAIN_RECORD_LIMIT = 10_000  # the drain's: AWS's maximum, its fastest setting on moto_server

DATAGEN_TASKS = 2
ROW_GROUP_ROWS = 256  # rows per sled entry in the leaves' store (leaf/src/store.rs GROUP_ROWS)
LATENCY_TARGET_MS = MAX_BATCH_INTERVAL_MS + 250
FAILOVER_TARGET_S = 3.0
PRODUCER_RATE = 500  # records/s during the failover scenario
RAFT_TASKS, RAFT_SECONDS = 64, 10  # bench-raft: concurrent committing tasks, for how long


def log(msg: str) -> None:
    """Progress, on stderr so that stdout holds only the header, figures and summary."""
    print(msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    """A scenario could not produce its figures; the message says why."""


class CeilingError(BenchError):
    """A ceiling tool is missing or failed: the scenario's own figures were still printed, and
    its cluster is not at fault (so its data need not be kept)."""


# --------------------------------------------------------------------------------------------
# Figures and the report


@dataclass
class Target:
    """`kind` is 'ratio>=' (against the ceiling), '<=' or '>=' (against the value itself)."""

    kind: str
    threshold: float

    def describe(self, unit: str) -> str:
        if self.kind == "ratio>=":
            return f"target >= {self.threshold:.2f}"
        value = f"{self.threshold:,.0f}" if float(self.threshold).is_integer() else fmt(self.threshold, unit)
        return f"target {self.kind} {value} {unit}"


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    ceiling: float | None = None
    ceiling_label: str = ""  # e.g. "ceiling(sled loop)"; empty when the figure has none
    higher_is_better: bool = True
    ratio_label: str = "ratio"  # "speed-up" for query times against their reference
    target: Target | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """The share of the ceiling reached (or, for times, the speed-up over the reference)."""
        if not self.ceiling or not self.value:
            return None
        return self.value / self.ceiling if self.higher_is_better else self.ceiling / self.value

    @property
    def status(self) -> str:
        if self.target is None:
            return ""
        if self.target.kind == "ratio>=":
            met = None if self.ratio is None else self.ratio >= self.target.threshold
        elif self.target.kind == "<=":
            met = self.value <= self.target.threshold
        else:
            met = self.value >= self.target.threshold
        return "n/a" if met is None else ("ok" if met else "MISS")

    def line(self) -> str:
        value = f"{fmt(self.value, self.unit):>11} {self.unit:<9}"
        ceiling = ""
        if self.ceiling_label:
            c = "n/a" if self.ceiling is None else f"{fmt(self.ceiling, self.unit)} {self.unit}"
            ceiling = f"{self.ceiling_label} {c}"
        ratio = ""
        if self.ratio is not None:
            suffix = "x" if self.ratio_label == "speed-up" else ""
            ratio = f"{self.ratio_label} {self.ratio:.2f}{suffix}"
        target = self.target.describe(self.unit) if self.target else ""
        text = f"{self.name:<32} {value} {ceiling:<44} {ratio:<15} {target:<27} {self.status:<4}"
        if self.note:
            text += f"  ({self.note})"
        return text.rstrip()

    def to_json(self) -> dict:
        return {
            "name": self.name, "value": self.value, "unit": self.unit,
            "ceiling": self.ceiling, "ceiling_label": self.ceiling_label or None,
            "ratio": self.ratio, "ratio_label": self.ratio_label if self.ratio is not None else None,
            "target": None if self.target is None else {
                "kind": self.target.kind, "threshold": self.target.threshold},
            "status": self.status or None, "note": self.note or None,
        }


def fmt(v: float, unit: str) -> str:
    """Rates as whole numbers with thousands separators, ms to 0.1, seconds to 0.01."""
    if unit.endswith("/s"):
        return f"{v:,.0f}"
    if unit == "ms":
        return f"{v:,.1f}"
    return f"{v:,.2f}"


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    outcomes: dict[str, str | None] = field(default_factory=dict)  # scenario -> None or why it broke

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        print(figure.line(), flush=True)

    def run(self, scenario: str, fn: Callable[[], None]) -> None:
        """Runs one scenario; a failure is recorded and printed, and the next scenario runs."""
        log(f"== {scenario}")
        started = time.monotonic()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any failure breaks this scenario only
            why = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
            why = " | ".join(line.strip() for line in why.splitlines() if line.strip())  # one line
            self.outcomes[scenario] = why
            if not isinstance(e, BenchError):
                traceback.print_exc(file=sys.stderr)
            if not isinstance(e, CeilingError):
                Cluster.keep_open_clusters()
            print(f"{scenario}: BROKE: {why}", flush=True)
        else:
            self.outcomes[scenario] = None
        log(f"== {scenario}: {time.monotonic() - started:.0f} s")

    def summary(self) -> None:
        print("\n== summary")
        for f in self.figures:
            print(f.line())
        for scenario, why in self.outcomes.items():
            print(f"{scenario:<10} {'ran' if why is None else 'BROKE: ' + why}")

    def to_json(self, header: dict) -> dict:
        return {
            **header,
            "figures": [f.to_json() for f in self.figures],
            "scenarios": {s: {"ran": why is None, "error": why} for s, why in self.outcomes.items()},
        }


# --------------------------------------------------------------------------------------------
# Clusters


def free_base(count: int) -> int:
    """A base port with `count` free ports after it (scripts/ports.py)."""
    try:
        return ports.free_base(count)
    except RuntimeError as e:
        raise BenchError(str(e)) from e


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class Cluster:
    """A local cluster started by deploy/local/up.sh, exactly as the Python tests start theirs.

    Aggregator i (Raft node id i) serves MySQL on mysql_port + i - 1; nodes are aggregator-i and
    leaf-i, with PID files and logs under the temporary data directory. With sim_no_limits the
    kinesis-sim is started here with --no-limits (up.sh has no way to pass it flags) and up.sh
    gets its endpoint through KINESIS_ENDPOINT. Used as a context manager: down.sh always runs;
    the data directory is removed unless a scenario broke while the cluster was up.
    """

    _open: set["Cluster"] = set()

    def __init__(self, bin_dir: Path, aggregators: int, leaves: int, emulator: str = "sim",
                 sim_no_limits: bool = False):
        for binary in ("aggregator", "leaf", "kinesis-sim"):
            if not (bin_dir / binary).exists():
                raise BenchError(f"{bin_dir / binary} not found (build the release binaries, "
                                 "or run scripts/bench.sh)")
        self.bin_dir = bin_dir
        self.aggregators, self.leaves = aggregators, leaves
        self.sim_no_limits = sim_no_limits
        self.data_dir = Path(tempfile.mkdtemp(prefix="shardline-bench-"))
        base = free_base(3 * aggregators + 2 * leaves + 1)  # one range, so no two roles overlap
        self.mysql_port = base
        self.agg_grpc_port = base + aggregators
        self.leaf_port = base + 2 * aggregators
        self.kinesis_port = base + 2 * aggregators + leaves
        self.metrics_port = base + 2 * aggregators + leaves + 1  # aggregators', then leaves'
        self.kinesis_endpoint = f"http://127.0.0.1:{self.kinesis_port}"
        self.env = {
            **os.environ,
            "AGGREGATORS": str(aggregators),
            "LEAVES": str(leaves),
            "DATA_DIR": str(self.data_dir),
            "MYSQL_PORT": str(base),
            "AGG_GRPC_PORT": str(self.agg_grpc_port),
            "LEAF_PORT": str(self.leaf_port),
            "KINESIS_PORT": str(self.kinesis_port),
            "METRICS_PORT": str(self.metrics_port),
            "KINESIS_EMULATOR": emulator,
            "KINESIS_ENDPOINT": self.kinesis_endpoint if sim_no_limits else "",
            "BIN_DIR": str(bin_dir),
            "READY_TIMEOUT": "90",
        }
        self.keep = False
        self.state: dict = {}  # what scenarios sharing this cluster have done to it
        self._sim: subprocess.Popen | None = None

    @classmethod
    def keep_open_clusters(cls) -> None:
        """Keeps the data and logs of every running cluster, for a scenario that broke."""
        for c in cls._open:
            c.keep = True

    def __enter__(self) -> "Cluster":
        Cluster._open.add(self)
        try:
            self._up()
        except BaseException:
            self.keep = True
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        Cluster._open.discard(self)
        if exc_type is not None:
            self.keep = True
        down = subprocess.run(["bash", str(REPO / "deploy/local/down.sh")], env=self.env,
                              capture_output=True, text=True, timeout=120)
        if down.returncode != 0:
            log(f"down.sh failed ({down.returncode}): {tail(down.stderr)}")
        if self._sim is not None:
            self._sim.terminate()
            try:
                self._sim.wait(10)
            except subprocess.TimeoutExpired:
                self._sim.kill()
                self._sim.wait()
        if self.keep:
            log(f"   data and logs kept in {self.data_dir}")
        else:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _up(self) -> None:
        if self.sim_no_limits:
            # up.sh's flags for the simulator, plus --no-limits.
            (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
            with open(self.data_dir / "logs" / "kinesis.log", "ab") as out:
                self._sim = subprocess.Popen(
                    [str(self.bin_dir / "kinesis-sim"), "--listen", f"127.0.0.1:{self.kinesis_port}",
                     "--data-dir", str(self.data_dir / "kinesis"), "--no-limits"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            wait_for_port(self.kinesis_port, 10)
        log(f"   starting {self.aggregators} aggregator(s), {self.leaves} leaves under {self.data_dir}")
        up = subprocess.run(["bash", str(REPO / "deploy/local/up.sh")], env=self.env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
        if up.returncode != 0:
            raise BenchError(f"deploy/local/up.sh failed ({up.returncode}): {tail(up.stderr or up.stdout)}")

    def port(self, node_id: int) -> int:
        """Aggregator node_id's MySQL port."""
        return self.mysql_port + node_id - 1

    def grpc_port(self, node_id: int) -> int:
        """Aggregator node_id's gRPC port (Raft, leaves)."""
        return self.agg_grpc_port + node_id - 1

    def connect(self, node_id: int = 1, db: str | None = None, read_timeout: float | None = 120,
                connect_timeout: float = 5) -> pymysql.Connection:
        return pymysql.connect(host="127.0.0.1", port=self.port(node_id), user="root", password="",
                               database=db, autocommit=True, connect_timeout=connect_timeout,
                               read_timeout=read_timeout, write_timeout=read_timeout)

    def pid(self, node: str) -> int:
        return int((self.data_dir / "pids" / f"{node}.pid").read_text().strip())

    def kill(self, node: str) -> None:
        """SIGKILL: no goodbye to the cluster, as a crash."""
        os.kill(self.pid(node), signal.SIGKILL)

    def log_text(self, node: str) -> str:
        path = self.data_dir / "logs" / f"{node}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def master_id(self, node_ids=None) -> int | None:
        """The master's node id as named by the first of `node_ids` that answers."""
        for i in node_ids or range(1, self.aggregators + 1):
            try:
                conn = self.connect(i, read_timeout=3, connect_timeout=1)
                try:
                    for row in query(conn, "SHOW AGGREGATORS"):
                        if str(row[5]) == "1":
                            return int(row[6])
                finally:
                    conn.close()
            except (pymysql.MySQLError, OSError):
                continue
        return None

    def kinesis(self):
        return kinesis_client(self.kinesis_endpoint)

    def leaf_metrics(self) -> "LeafMetrics":
        return LeafMetrics([self.metrics_port + self.aggregators + i for i in range(self.leaves)])


class LeafMetrics:
    """Reads the leaves' Prometheus /metrics over kept-alive HTTP connections."""

    def __init__(self, ports: list[int]):
        self.ports = ports
        self.conns: dict[int, http.client.HTTPConnection] = {}

    def total(self, name: str) -> float:
        """A metric (full name, labels included) summed over the leaves; a leaf that does not
        answer counts 0."""
        total = 0.0
        for port in self.ports:
            conn = self.conns.get(port) or http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                conn.request("GET", "/metrics")
                text = conn.getresponse().read().decode()
                self.conns[port] = conn
            except (OSError, http.client.HTTPException):
                conn.close()
                self.conns.pop(port, None)
                continue
            # Found, not split into lines: this runs every 20 ms during the measured run.
            at = text.find(name + " ")
            while at >= 0:
                end = text.find("\n", at)
                if at == 0 or text[at - 1] == "\n":
                    total += float(text[at:end if end >= 0 else len(text)].rsplit(" ", 1)[1])
                at = text.find(name + " ", at + 1)
        return total

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


def query(conn: pymysql.Connection, sql: str) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(sql)
        return list(cur.fetchall())


class Poller:
    """Queries for the failover scenario: one connection per aggregator, short timeouts, and an
    error (a dead node, an election under way) answered by None and a fresh connection next time."""

    def __init__(self, cluster: Cluster, db: str):
        self.cluster, self.db = cluster, db
        self.conns: dict[int, pymysql.Connection] = {}

    def query(self, node_id: int, sql: str) -> list[tuple] | None:
        try:
            if node_id not in self.conns:
                self.conns[node_id] = self.cluster.connect(node_id, self.db, read_timeout=2,
                                                           connect_timeout=1)
            return query(self.conns[node_id], sql)
        except (pymysql.MySQLError, OSError):
            conn = self.conns.pop(node_id, None)
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            return None

    def close(self) -> None:
        for conn in self.conns.values():
            with contextlib.suppress(Exception):
                conn.close()


def wait_until(what: str, timeout: float, fn: Callable, interval: float = 0.05,
               why: Callable[[], str] | None = None):
    """fn()'s first truthy answer; BenchError after `timeout` s (with why() appended if given)."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() >= deadline:
            extra = ""
            if why is not None:
                with contextlib.suppress(Exception):
                    extra = f" ({why()})"
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# Pipelines and Kinesis


def prepare_database(conn: pymysql.Connection, db: str, batch_size: int | None = None) -> None:
    """The pipeline settings of the integration tests, and a fresh database selected."""
    query(conn, 'SET GLOBAL experimental_features_config = "kafka_connect_enabled=true"')
    query(conn, f"SET GLOBAL pipelines_extractor_max_batch_interval_ms = {MAX_BATCH_INTERVAL_MS}")
    query(conn, f"SET GLOBAL pipelines_batch_interval = {BATCH_INTERVAL_MS}")
    if batch_size is not None:
        query(conn, f"SET GLOBAL pipelines_extractor_batch_size = {batch_size}")
    query(conn, f"CREATE DATABASE {db}")
    query(conn, f"USE {db}")


def create_kinesis_pipeline(conn: pymysql.Connection, name: str, stream: str, tasks: int = 4,
                            **extra) -> None:
    """The spec's CREATE PIPELINE (plus `extra` CONFIG keys); leaves find the emulator through
    AWS_ENDPOINT_URL_KINESIS."""
    config = json.dumps({
        "connector.class": "com.singlestore.kafka.connect.kinesis.KinesisSourceConnector",
        "aws.access.key.id": "test", "aws.secret.access.key": "test",
        "kafka.topic": "kinesis-topic", "kinesis.stream": stream, "kinesis.region": "us-east-1",
        "tasks.max": tasks, **extra,
    })
    query(conn, f"CREATE INFERRED PIPELINE {name} AS LOAD DATA KAFKACONNECT 'kafka-connector' "
                f"CONFIG '{config}' CREDENTIALS '{{}}' FORMAT AVRO")


def pipeline_diagnosis(conn: pymysql.Connection, name: str) -> str:
    """The pipeline's state and latest error, for a timeout message."""
    state = query(conn, f"SELECT STATE FROM information_schema.PIPELINES WHERE PIPELINE_NAME = '{name}'")
    errors = query(conn, "SELECT ERROR_MESSAGE FROM information_schema.PIPELINES_ERRORS "
                         f"WHERE PIPELINE_NAME = '{name}' ORDER BY ERROR_ID DESC LIMIT 1")
    text = f"pipeline {name} is {state[0][0] if state else 'missing'}"
    return text + (f", last error: {errors[0][0]}" if errors else "")


def count_rows(conn: pymysql.Connection, table: str) -> int:
    return int(query(conn, f"SELECT COUNT(*) FROM {table}")[0][0])


def wait_for_rows(conn: pymysql.Connection, table: str, n: int, timeout: float, interval: float) -> None:
    """Polls COUNT(*) until it reaches n; more than n would be duplicates, which breaks the run."""
    def reached():
        got = count_rows(conn, table)
        if got > n:
            raise BenchError(f"{table} holds {got:,} rows, more than the {n:,} put (duplicates)")
        return got == n
    wait_until(f"{n:,} rows in {table}", timeout, reached, interval,
               why=lambda: f"{count_rows(conn, table):,} so far; {pipeline_diagnosis(conn, table)}")


def wait_for_loaded_rows(c: Cluster, conn: pymysql.Connection, pipeline: str, n: int,
                         timeout: float) -> tuple[float, float]:
    """Polls the rows the leaves loaded (committed and made visible: shardline_rows_loaded_total
    on their /metrics) every 20 ms until they reach n. A stopwatch that costs the cluster next to
    nothing: a SQL poll (about 2 ms of the aggregator's CPU each) or COUNT(*) (a scan on every
    leaf) would take CPU from the run it measures. Returns when (perf_counter) the first loaded
    rows were seen, and when all n were."""
    name = f'shardline_rows_loaded_total{{pipeline="{pipeline}"}}'
    first: list[float] = []
    metrics = c.leaf_metrics()

    def reached() -> bool:
        got = metrics.total(name)
        if got and not first:
            first.append(time.perf_counter())
        return got >= n
    try:
        wait_until(f"{n:,} loaded rows in pipeline {pipeline}", timeout, reached, 0.02,
                   why=lambda: pipeline_diagnosis(conn, pipeline))
        done = time.perf_counter()
    finally:
        metrics.close()
    return first[0], done


def kinesis_client(endpoint: str):
    return boto3.client(
        "kinesis", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="test", aws_secret_access_key="test",
        config=botocore.config.Config(retries={"max_attempts": 3}, connect_timeout=5, read_timeout=30))


def create_stream(k, name: str, shards: int) -> None:
    k.create_stream(StreamName=name, ShardCount=shards)
    wait_until(f"stream {name} ACTIVE", 30, lambda: k.describe_stream_summary(StreamName=name)[
        "StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE")


def json_payload(i: int, size: int = 100) -> bytes:
    """A JSON object of about `size` bytes."""
    base = {"i": i, "ts": time.time_ns(), "pad": ""}
    pad = max(0, size - len(json.dumps(base, separators=(",", ":"))))
    return json.dumps({**base, "pad": "x" * pad}, separators=(",", ":")).encode()


def put_records(k, stream: str, n: int, per_call: int = 500) -> None:
    """Puts n JSON records with random partition keys, retrying the ones a call refused."""
    pending = [{"Data": json_payload(i), "PartitionKey": f"pk-{random.getrandbits(64):x}"} for i in range(n)]
    while pending:
        chunk, pending = pending[:per_call], pending[per_call:]
        r = k.put_records(StreamName=stream, Records=chunk)
        if r["FailedRecordCount"]:
            pending += [rec for rec, res in zip(chunk, r["Records"]) if "ErrorCode" in res]
            time.sleep(0.1)


class Producer(threading.Thread):
    """Puts ~rate records/s (a PutRecords call every 100 ms) with random partition keys until
    stopped. Failures are counted, not raised: the cluster under test is what matters."""

    def __init__(self, endpoint: str, stream: str, rate: int):
        super().__init__(daemon=True)
        self.endpoint, self.stream, self.rate = endpoint, stream, rate
        self.stopping = threading.Event()
        self.put = self.failed = 0
        self.last_error = ""

    def run(self) -> None:
        k = kinesis_client(self.endpoint)
        period = 0.1
        per_call = max(1, round(self.rate * period))
        next_call, i = time.monotonic(), 0
        while not self.stopping.is_set():
            records = [{"Data": json_payload(i + j), "PartitionKey": f"pk-{random.getrandbits(64):x}"}
                       for j in range(per_call)]
            i += per_call
            try:
                r = k.put_records(StreamName=self.stream, Records=records)
                self.put += per_call - r["FailedRecordCount"]
                self.failed += r["FailedRecordCount"]
            except Exception as e:  # noqa: BLE001 - counted; the producer keeps going
                self.failed += per_call
                self.last_error = str(e)
            next_call += period
            self.stopping.wait(max(0.0, next_call - time.monotonic()))

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)


# --------------------------------------------------------------------------------------------
# Ceiling tools (the bench crate's binaries)


def require_tool(bin_dir: Path, name: str) -> Path:
    """The path of one of the bench crate's tools, or CeilingError saying how to build it."""
    path = bin_dir / name
    if not path.exists():
        raise CeilingError(f"{path} not found: it is built by `cargo build --release -p bench` "
                           "(scripts/bench.sh does that unless BIN_DIR is set)")
    return path


def run_json_tool(bin_dir: Path, name: str, args: list[str], timeout: float = 900) -> dict:
    """Runs one of the bench crate's tools; its last stdout line that is a JSON object."""
    path = require_tool(bin_dir, name)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_REGION": "us-east-1"}
    p = subprocess.run([str(path), *args], capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        raise BenchError(f"{name} exited with {p.returncode}: {tail(p.stderr or p.stdout, 5)}")
    for line in reversed(p.stdout.splitlines()):
        if line.strip().startswith("{"):
            return json.loads(line)
    raise BenchError(f"{name} printed no JSON line: {tail(p.stdout, 5)}")


def measure_ceiling(bin_dir: Path, name: str, args: list[str], key: str) -> tuple[float | None, dict, str | None]:
    """(value, the tool's JSON, None), or (None, {}, why) when the tool is missing or fails: the
    scenario still prints its own figure, then reports the ceiling's error as its failure."""
    log(f"   ceiling: {name} {' '.join(args)}")
    try:
        out = run_json_tool(bin_dir, name, args)
        return float(out[key]), out, None
    except (BenchError, subprocess.TimeoutExpired, KeyError, ValueError) as e:  # JSONDecodeError is a ValueError
        return None, {}, f"ceiling {name}: {e}"


# --------------------------------------------------------------------------------------------
# Scenarios


def load_datagen(c: Cluster, rows: int) -> float:
    """Loads `rows` datagen rows into d.gen with START PIPELINE FOREGROUND; its wall time (s)."""
    if c.state.get("datagen_attempted"):
        raise BenchError("an earlier datagen load on this cluster broke; its rows are incomplete")
    c.state["datagen_attempted"] = True
    conn = c.connect(read_timeout=None)
    try:
        prepare_database(conn, "d", INGEST_BATCH_SIZE)
        # Keep every batch's row in PIPELINES_BATCHES_SUMMARY (the default keeps 1000).
        keep = 2 * rows // INGEST_BATCH_SIZE + 100
        if keep > 1000:
            query(conn, f"SET GLOBAL pipelines_batches_metadata_to_keep = {min(keep, 1_000_000)}")
        config = json.dumps({
            "connector.class": "io.shardline.connect.datagen.DatagenSourceConnector",
            "tasks.max": DATAGEN_TASKS, "datagen.rate": 0, "datagen.records": rows // DATAGEN_TASKS,
            "kafka.topic": "gen",
        })
        query(conn, f"CREATE INFERRED PIPELINE gen AS LOAD DATA KAFKACONNECT 'datagen' CONFIG '{config}' FORMAT AVRO")
        log(f"   START PIPELINE gen FOREGROUND ({rows:,} rows)")
        started = time.perf_counter()
        query(conn, "START PIPELINE gen FOREGROUND")
        seconds = time.perf_counter() - started
        got = count_rows(conn, "gen")
        if got != rows:
            raise BenchError(f"the datagen pipeline loaded {got:,} rows, not {rows:,}")
        c.state["datagen_rows"] = rows
        return seconds
    finally:
        conn.close()


def scenario_datagen(args, report: Report, gen_cluster: Callable[[], Cluster]) -> None:
    rows = DATAGEN_TASKS * (args.rows // DATAGEN_TASKS)
    # The ceilings first, while no cluster competes for the machine: the same rows in row groups
    # of the leaves' size (the ceiling), and one sled entry per row (for reference).
    sled_args = ["--rows", str(rows), "--payload-bytes", "32", "--batch", str(INGEST_BATCH_SIZE)]
    ceiling, _, ceiling_error = measure_ceiling(
        args.bin_dir, "bench-sled", sled_args + ["--group", str(ROW_GROUP_ROWS)], "rows_per_sec")
    per_row, _, per_row_error = measure_ceiling(args.bin_dir, "bench-sled", sled_args, "rows_per_sec")
    c = gen_cluster()
    seconds = load_datagen(c, rows)
    conn = c.connect(db="d")
    try:
        batches = query(conn, "SELECT BATCH_TIME FROM information_schema.PIPELINES_BATCHES_SUMMARY "
                              "WHERE DATABASE_NAME = 'd' AND PIPELINE_NAME = 'gen' AND BATCH_STATE = 'Succeeded'")
    finally:
        conn.close()
    # Batches overlap (a task extracts the next while the last one loads), so their times do
    # not add up to the wall clock: the count and the median are context, not a figure.
    times = sorted(float(r[0]) for r in batches)
    median = f", median BATCH_TIME {statistics.median(times):.2f} s" if times else ""
    per_row_note = f"; a row per sled entry: {per_row:,.0f} rows/s" if per_row else ""
    report.add(Figure("ingest.datagen", rows / seconds, "rows/s", ceiling, "ceiling(sled loop, groups)",
                      target=Target("ratio>=", 0.5),
                      note=f"{rows:,} rows in {seconds:.2f} s, {len(times)} batches{median}{per_row_note}"))
    if ceiling_error or per_row_error:
        raise CeilingError(ceiling_error or per_row_error)


def timed(conn: pymysql.Connection, sql: str, runs: int = 3) -> tuple[float, float, int]:
    """(best ms, median ms, the answer) over `runs` runs of a one-value query."""
    times, answer = [], None
    for _ in range(runs):
        started = time.perf_counter()
        answer = int(query(conn, sql)[0][0])
        times.append((time.perf_counter() - started) * 1000)
    return min(times), statistics.median(times), answer


def scenario_query(args, report: Report, gen_cluster: Callable[[], Cluster]) -> None:
    c = gen_cluster()
    rows = DATAGEN_TASKS * (args.rows // DATAGEN_TASKS)
    if c.state.get("datagen_rows") != rows:
        log("   loading the datagen rows first")
        load_datagen(c, rows)
    per_task = rows // DATAGEN_TASKS
    # seq runs 0..per_task-1 in each task: a point hits one row per task, the range 999 per task.
    point, low = min(123_456, per_task - 1), max(0, per_task - 1000)
    json_expr = "JSON_EXTRACT_BIGINT(record, 'seq')"
    conn = c.connect(db="d", read_timeout=None)
    try:
        reference = {
            "point": timed(conn, f"SELECT COUNT(*) FROM gen WHERE {json_expr} = {point}"),
            "range": timed(conn, f"SELECT COUNT(*) FROM gen WHERE {json_expr} > {low}"),
        }
        started = time.perf_counter()
        query(conn, f"ALTER TABLE gen ADD COLUMN seq AS {json_expr} PERSISTED BIGINT")
        alter_s = time.perf_counter() - started
        started = time.perf_counter()
        query(conn, "CREATE INDEX seq_idx ON gen (seq)")
        index_s = time.perf_counter() - started
        indexed = {
            "point": timed(conn, f"SELECT COUNT(*) FROM gen WHERE seq = {point}"),
            "range": timed(conn, f"SELECT COUNT(*) FROM gen WHERE seq > {low}"),
        }
    finally:
        conn.close()
    for kind, where in (("point", f"= {point:,}"), ("range", f"> {low:,}")):
        (best, median, answer), (ref_best, ref_median, ref_answer) = indexed[kind], reference[kind]
        if answer != ref_answer:
            raise BenchError(f"seq {where}: the index answers {answer}, the JSON expression {ref_answer}")
        report.add(Figure(
            f"query.{kind}.indexed", best, "ms", ref_best, "reference(json expr)", higher_is_better=False,
            ratio_label="speed-up",
            note=f"COUNT(*) WHERE seq {where} = {answer:,}; best of 3; medians {median:.1f} / {ref_median:.1f} ms"))
    report.add(Figure("query.add_computed_column", alter_s, "s", note=f"ALTER TABLE ... PERSISTED BIGINT, {rows:,} rows"))
    report.add(Figure("query.index_build", index_s, "s", note=f"CREATE INDEX seq_idx, {rows:,} rows"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss(pid: int) -> int:
    """A process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss(pid: int) -> bool:
    """Starts a process's VmHWM again from its current RSS (Linux clear_refs 5); False where
    the kernel refuses it, so a peak read later still includes what came before."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def in_segments(conn: pymysql.Connection, db: str, table: str) -> int:
    rows = query(conn, "SELECT SUM(ROWS_COUNT) FROM information_schema.COLUMNAR_SEGMENTS "
                       f"WHERE DATABASE_NAME = '{db}' AND TABLE_NAME = '{table}' AND COLUMN_NAME = 'record'")
    return int(rows[0][0] or 0)


def scenario_storage(args, report: Report, gen_cluster: Callable[[], Cluster]) -> None:
    """Issue 17's figures on the datagen table: queries over column segments, a full scan
    through the MySQL protocol against the segment files decoded alone, peak memory, bytes on
    disk, and JSON point filters from 32 clients on a small table."""
    c = gen_cluster()
    rows = DATAGEN_TASKS * (args.rows // DATAGEN_TASKS)
    if c.state.get("datagen_rows") != rows:
        log("   loading the datagen rows first")
        load_datagen(c, rows)
    conn = c.connect(db="d", read_timeout=None)
    try:
        # Flushes run behind ingest: wait until (nearly) every row is in a column segment.
        wait_until("the rows in column segments", 900,
                   lambda: in_segments(conn, "d", "gen") >= rows - 4 * 65_536, interval=1)
        flushed = in_segments(conn, "d", "gen")
        per_task = rows // DATAGEN_TASKS
        point = min(123_456, per_task - 1)
        for name, sql, limit_ms in (
            ("count", "SELECT COUNT(*) FROM gen", 20),
            ("json_point", f"SELECT COUNT(*) FROM gen WHERE JSON_EXTRACT_BIGINT(record, 'seq') = {point}", 100),
            ("group_by", "SELECT JSON_EXTRACT_BIGINT(record, 'task') t, COUNT(*) FROM gen GROUP BY t", 1000),
            ("limit", "SELECT * FROM gen LIMIT 10", 50),
        ):
            times = []
            for _ in range(3):
                started = time.perf_counter()
                query(conn, sql)
                times.append((time.perf_counter() - started) * 1000)
            report.add(Figure(f"storage.{name}", min(times), "ms", higher_is_better=False,
                              target=Target("<=", limit_ms),
                              note=f"best of 3 (median {statistics.median(times):.1f} ms); {sql}"))
        raw = float(query(conn, "SELECT SUM(LENGTH(topic) + LENGTH(id) + LENGTH(record)) FROM gen")[0][0])
        on_disk = float(query(conn, "SELECT SUM(COMPRESSED_SIZE) FROM (SELECT DISTINCT NODE, DATABASE_NAME, "
                                    "TABLE_NAME, ORDINAL, SEGMENT_ID, COMPRESSED_SIZE FROM "
                                    "information_schema.COLUMNAR_SEGMENTS WHERE DATABASE_NAME = 'd') s")[0][0])
        report.add(Figure("storage.bytes_per_row", on_disk / max(flushed, 1), "B", raw / rows,
                          "raw(json text)", higher_is_better=False, ratio_label="raw/disk",
                          note=f"{flushed:,} rows in segments, {on_disk / 2**20:,.0f} MiB on disk; goal <= 0.5 of raw"))
    finally:
        conn.close()
    nodes = ["aggregator-1"] + [f"leaf-{i}" for i in range(1, c.leaves + 1)]
    ingest_peaks = {n: peak_rss(c.pid(n)) for n in nodes}
    # The peak during SELECT * alone: each node's VmHWM starts again from its RSS now.
    reset = all(reset_peak_rss(c.pid(n)) for n in nodes)
    # A full scan through the MySQL protocol (rows streamed, not kept). The figure is a lean
    # Rust client's (bench-mysql-scan: what the server sends); beside it the mariadb
    # command-line client (what a user piping rows to a file sees: it spends more CPU per row on
    # its output than the aggregator spends producing it) and pymysql (pure Python).
    before = {n: cpu_seconds(c.pid(n)) for n in nodes}
    lean = run_json_tool(args.bin_dir, "bench-mysql-scan", ["--port", str(c.port(1)), "SELECT * FROM d.gen"])
    lean_rows, lean_s = int(lean["rows"]), float(lean["seconds"])
    server_cpu = {n: cpu_seconds(c.pid(n)) - before[n] for n in nodes}
    if lean_rows != rows:
        raise BenchError(f"bench-mysql-scan read {lean_rows:,} rows of {rows:,}")
    mariadb = shutil.which("mariadb") or shutil.which("mysql")
    mariadb_note = "no mariadb client"
    if mariadb:
        started = time.perf_counter()
        proc = subprocess.Popen([mariadb, "-h127.0.0.1", f"-P{c.port(1)}", "-uroot", "--quick", "--batch",
                                 "--skip-column-names", "-e", "SELECT * FROM d.gen"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        c_rows = 0
        while chunk := proc.stdout.read(1 << 20):
            c_rows += chunk.count(b"\n")
        err = proc.stderr.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"mariadb SELECT * failed: {err.strip()}")
        c_s = time.perf_counter() - started
        mariadb_note = (f"mariadb client (--quick, to a pipe): {c_rows / c_s:,.0f} rows/s, its own CPU "
                        f"{1e6 * (usage.ru_utime + usage.ru_stime) / max(c_rows, 1):.2f} us/row")
    scan = c.connect(db="d", read_timeout=None)
    try:
        cur = scan.cursor(pymysql.cursors.SSCursor)
        started = time.perf_counter()
        cur.execute("SELECT * FROM gen")
        streamed = sum(1 for _ in cur)
        scan_s = time.perf_counter() - started
        cur.close()
    finally:
        scan.close()
    scan_peaks = {n: peak_rss(c.pid(n)) for n in nodes}
    # ... next to the same segment files decoded alone.
    dirs = [str(c.data_dir / f"leaf-{i}" / "store" / "segments") for i in range(1, c.leaves + 1)]
    ceiling, _, ceiling_error = measure_ceiling(args.bin_dir, "bench-segment-scan", dirs, "rows_per_sec")
    per_row = ", ".join(f"{n} {1e6 * v / max(lean_rows, 1):.2f}" for n, v in server_cpu.items())
    report.add(Figure("storage.full_scan", lean_rows / lean_s, "rows/s", ceiling, "ceiling(parquet decode)",
                      target=Target("ratio>=", 0.5),
                      note=f"SELECT * of {lean_rows:,} rows through the MySQL protocol by a lean client "
                           f"(bench-mysql-scan) in {lean_s:.1f} s; its CPU "
                           f"{1e6 * float(lean['client_cpu_seconds']) / max(lean_rows, 1):.2f} us/row, the "
                           f"servers' us/row: {per_row}; {mariadb_note}; pymysql SSCursor: "
                           f"{streamed / scan_s:,.0f} rows/s"))
    worst = max(scan_peaks.values())
    report.add(Figure("storage.peak_rss", worst / 2**20, "MiB", higher_is_better=False, target=Target("<=", 512),
                      note=("VmHWM during the two SELECT * scans: " if reset else
                            "VmHWM since start (the kernel refused a reset; ingest included): ") +
                           ", ".join(f"{n} {v / 2**20:.0f}" for n, v in scan_peaks.items()) +
                           "; since start (ingest included): " +
                           ", ".join(f"{n} {v / 2**20:.0f}" for n, v in ingest_peaks.items())))
    concurrency(c, report)
    if ceiling_error:
        raise CeilingError(ceiling_error)


def concurrency(c: Cluster, report: Report, clients: int = 32, seconds: float = 10) -> None:
    """32 clients, each on its own connection, running JSON point filters on a 10,000-row table."""
    conn = c.connect(read_timeout=None)
    try:
        prepare_database(conn, "small")
        config = json.dumps({"connector.class": "io.shardline.connect.datagen.DatagenSourceConnector",
                             "tasks.max": 2, "datagen.rate": 0, "datagen.records": 5000})
        query(conn, f"CREATE INFERRED PIPELINE g AS LOAD DATA KAFKACONNECT 'datagen' CONFIG '{config}' FORMAT AVRO")
        query(conn, "START PIPELINE g FOREGROUND")
        # Quiet partitions flush whatever they hold after 10 s: the queries read segments.
        wait_until("the small table in column segments", 120,
                   lambda: in_segments(conn, "small", "g") >= 10_000, interval=1)
    finally:
        conn.close()
    latencies, wall = point_filter_clients(c, clients, seconds)
    report.add(Figure("storage.concurrent_point_filters", len(latencies) / wall, "q/s",
                      target=Target(">=", 2000),
                      note=f"{clients} clients, 10,000 rows, {len(latencies):,} queries; p50 "
                           f"{percentile(latencies, 50):.0f} ms, p99 {percentile(latencies, 99):.0f} ms"))


def point_filter_clients(c: Cluster, clients: int, seconds: float,
                         shape_each: bool = False) -> tuple[list[float], float]:
    """`clients` threads, each on its own connection, running JSON point filters on table
    small.g for `seconds`: every query's latency (ms), and the wall time. With `shape_each`,
    every statement has a shape of its own (a column alias numbered per query), so the
    aggregator plans each one in full rather than binding its value into a kept plan."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        mine = []
        k = c.connect(db="small", read_timeout=60)
        try:
            n = i
            while time.perf_counter() < stop:
                started = time.perf_counter()
                alias = f" AS c{n}" if shape_each else ""
                query(k, f"SELECT COUNT(*){alias} FROM g WHERE JSON_EXTRACT_BIGINT(record, 'seq') = {n % 5000}")
                mine.append((time.perf_counter() - started) * 1000)
                n += clients
        finally:
            k.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - started


def scenario_kinesis(args, report: Report) -> None:
    n, stream, rounds = args.kinesis_records, "bench-ingest", args.kinesis_rounds
    results = []  # per pipeline: (ratio, pipeline s, first rows s, ceiling rate, drains s)
    drains: list[tuple[float, float]] = []  # (records/s, s) in the order they ran
    ceiling_error = None

    def drain() -> bool:
        nonlocal ceiling_error
        rate, out, error = measure_ceiling(
            args.bin_dir, "bench-kinesis-drain",
            ["--endpoint", c.kinesis_endpoint, "--stream", stream, "--limit", str(DRAIN_RECORD_LIMIT)],
            "records_per_sec")
        if out and int(out.get("records", n)) != n:
            error = f"bench-kinesis-drain read {out.get('records')} records, not {n}"
        if error or not rate:
            ceiling_error = error or "no drain figure"
            return False
        drains.append((rate, out["seconds"]))
        return True

    with Cluster(args.bin_dir, 1, 2, emulator="moto") as c:
        k = c.kinesis()
        create_stream(k, stream, 4)
        log(f"   putting {n:,} records into {stream} (moto_server)")
        put_records(k, stream, n)
        conn = c.connect()
        try:
            prepare_database(conn, "d", INGEST_BATCH_SIZE)
            # Drains and pipelines alternate on the same stream (which keeps its records), each
            # pipeline between two drains: moto_server's speed drifts by 10-20% over minutes, so
            # a pipeline is compared with the mean of the drains just before and just after it.
            if not drain():
                raise CeilingError(ceiling_error or "no drain figure")
            for r in range(1, rounds + 1):
                name = f"kp{r}"
                create_kinesis_pipeline(conn, name, stream, tasks=4,
                                        **{"kinesis.record.limit": KINESIS_RECORD_LIMIT})
                started = time.perf_counter()
                query(conn, f"START PIPELINE {name}")
                first, done = wait_for_loaded_rows(c, conn, name, n, timeout=120 + n / 100)
                seconds = done - started
                # Untimed: the table holds exactly the n records (no loss, no duplicates).
                wait_for_rows(conn, name, n, timeout=30, interval=0.01)
                query(conn, f"STOP PIPELINE {name}")
                if not drain():
                    break
                (before, before_s), (after, after_s) = drains[-2], drains[-1]
                ceiling = (before + after) / 2
                ratio = n / seconds / ceiling
                log(f"   round {r}: drains {before_s:.2f} s and {after_s:.2f} s around a pipeline "
                    f"of {seconds:.2f} s, ratio {ratio:.3f}")
                results.append((ratio, seconds, first - started, ceiling, (before_s, after_s)))
        finally:
            conn.close()
    if not results:
        raise CeilingError(ceiling_error or "no round ran")
    ordered = sorted(results)
    ratio, seconds, first_s, ceiling, (before_s, after_s) = ordered[(len(ordered) - 1) // 2]
    report.add(Figure("ingest.kinesis", n / seconds, "records/s", ceiling, "ceiling(GetRecords drain)",
                      target=Target("ratio>=", 0.9),
                      note=f"{n:,} records, 4 shards, moto_server; the median of {len(results)} rounds "
                           f"(ratios {', '.join(f'{x[0]:.2f}' for x in results)}), this one "
                           f"{seconds:.2f} s between drains of {before_s:.2f} and {after_s:.2f} s"))
    report.add(Figure("ingest.kinesis.first_batch", first_s * 1000, "ms",
                      note="START PIPELINE until the first rows were loaded (polled every 20 ms), "
                           "in that round: the fixed cost inside the figure above"))
    if ceiling_error:
        raise CeilingError(ceiling_error)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = math.ceil(len(ordered) * p / 100)
    return ordered[min(len(ordered), max(1, rank)) - 1]


def scenario_latency(args, report: Report) -> None:
    stream = "bench-latency"
    with Cluster(args.bin_dir, 1, 2, sim_no_limits=True) as c:
        k = c.kinesis()
        create_stream(k, stream, 2)
        conn = c.connect()
        try:
            prepare_database(conn, "d")
            create_kinesis_pipeline(conn, "kp", stream, tasks=4)
            query(conn, "START PIPELINE kp")
            # One record through first: the tasks are assigned and reading before we measure.
            k.put_record(StreamName=stream, Data=b'{"warmup":true}', PartitionKey="warmup")
            wait_for_rows(conn, "kp", 1, timeout=60, interval=0.05)
            log(f"   {args.latency_samples} probes")
            latencies, poll_ms = [], []
            for i in range(args.latency_samples):
                # A random pause, so probes land at every phase of the extractor's batch cycle.
                time.sleep(random.uniform(0, MAX_BATCH_INTERVAL_MS / 1000))
                k.put_record(StreamName=stream, Data=json.dumps({"probe": i}).encode(),
                             PartitionKey=f"probe-{i}")
                acked = time.perf_counter()
                expected = i + 2  # the warm-up record and probes 0..i
                while True:
                    started = time.perf_counter()
                    got = count_rows(conn, "kp")
                    poll_ms.append((time.perf_counter() - started) * 1000)
                    if got >= expected:
                        break
                    if time.perf_counter() - acked > 10:
                        raise BenchError(f"probe {i} not visible after 10 s ({pipeline_diagnosis(conn, 'kp')})")
                    time.sleep(0.005)
                if got > expected:
                    raise BenchError(f"kp holds {got} rows after probe {i}, expected {expected} (duplicates)")
                latencies.append((time.perf_counter() - acked) * 1000)
        finally:
            conn.close()
    n = len(latencies)
    report.add(Figure("latency.p50", percentile(latencies, 50), "ms", note=f"{n} probes, 2 shards, kinesis-sim --no-limits"))
    report.add(Figure("latency.p99", percentile(latencies, 99), "ms", target=Target("<=", LATENCY_TARGET_MS),
                      note=f"max batch interval {MAX_BATCH_INTERVAL_MS} ms + 250; max {max(latencies):.1f} ms"))
    report.add(Figure("latency.poll_query", statistics.median(poll_ms), "ms",
                      note=f"median of {len(poll_ms)} SELECT COUNT(*) FROM kp, included in every sample"))


def shard_offsets(poller: Poller, node_ids) -> dict[str, str] | None:
    """Committed sequence number per shard of pipeline kp, from the first aggregator that answers."""
    sql = ("SELECT JSON_EXTRACT_STRING(`KEY`, 'shardId'), JSON_EXTRACT_STRING(`VALUE`, 'sequenceNumber') "
           "FROM information_schema.PIPELINES_SOURCE_OFFSETS WHERE PIPELINE_NAME = 'kp'")
    for i in node_ids:
        rows = poller.query(i, sql)
        if rows is not None:
            return {r[0]: r[1] for r in rows}
    return None


def all_advanced(before: dict[str, str], now: dict[str, str] | None) -> bool:
    """Whether every shard's committed offset differs from (so is past) its value in `before`."""
    return now is not None and len(now) >= len(before) and all(now.get(s) != v for s, v in before.items())


def leaf_running_a_task(c: Cluster) -> tuple[str, str]:
    """A leaf whose log shows it started a task (leaf-1 if it did), and how it was chosen."""
    for i in range(1, c.leaves + 1):
        if "starting task" in c.log_text(f"leaf-{i}"):
            return f"leaf-{i}", "its log shows a task"
    return "leaf-1", "no leaf log shows a task"


def scenario_failover(args, report: Report) -> None:
    stream, shards = "bench-failover", 4
    with Cluster(args.bin_dir, 3, 3) as c:
        k = c.kinesis()
        create_stream(k, stream, shards)
        master = c.master_id()
        if master is None:
            raise BenchError("no aggregator names a master")
        conn = c.connect(master)
        try:
            prepare_database(conn, "d")
            create_kinesis_pipeline(conn, "kp", stream, tasks=shards)
            query(conn, "START PIPELINE kp")
        finally:
            conn.close()
        producer = Producer(c.kinesis_endpoint, stream, PRODUCER_RATE)
        producer.start()
        poller = Poller(c, "d")
        try:
            everyone = list(range(1, c.aggregators + 1))
            first = wait_until("every shard to commit an offset", 60,
                               lambda: (o := shard_offsets(poller, [master])) and len(o) == shards and o)
            wait_until("a steady state (every shard advancing)", 30,
                       lambda: all_advanced(first, shard_offsets(poller, [master])))

            # (a) A leaf dies.
            victim, chosen = leaf_running_a_task(c)
            victim_port = c.leaf_port + int(victim.split("-")[1]) - 1
            before = wait_until("the offsets", 10, lambda: shard_offsets(poller, [master]))
            c.kill(victim)
            killed = time.perf_counter()
            log(f"   SIGKILL {victim} ({chosen})")
            offline_s = None
            while True:
                if offline_s is None:
                    leaves = poller.query(master, "SHOW LEAVES") or []
                    if any(str(r[1]) == str(victim_port) and r[5] == "offline" for r in leaves):
                        offline_s = time.perf_counter() - killed
                if all_advanced(before, shard_offsets(poller, [master])):
                    resume_s = time.perf_counter() - killed
                    break
                if time.perf_counter() - killed > 60:
                    raise BenchError(f"shards did not all advance within 60 s of killing {victim}")
                time.sleep(0.05)
            if offline_s is not None:
                report.add(Figure("failover.leaf_kill.offline", offline_s, "s",
                                  note=f"{victim} marked offline (heartbeat timeout 2 s)"))
            report.add(Figure("failover.leaf_kill.resume", resume_s, "s",
                              target=Target("<=", FAILOVER_TARGET_S),
                              note=f"every shard's offset past its value at the kill of {victim} ({chosen})"))

            # (b) The master aggregator dies.
            steady = wait_until("the offsets", 10, lambda: shard_offsets(poller, everyone))
            wait_until("every shard advancing again", 30,
                       lambda: all_advanced(steady, shard_offsets(poller, everyone)))
            time.sleep(1)
            master = c.master_id()
            if master is None:
                raise BenchError("no aggregator names a master before the master kill")
            survivors = [i for i in everyone if i != master]
            before = wait_until("the offsets", 10, lambda: shard_offsets(poller, [master]))
            c.kill(f"aggregator-{master}")
            killed = time.perf_counter()
            log(f"   SIGKILL aggregator-{master} (the master)")
            new_master, new_master_s = None, None
            while True:
                if new_master is None:
                    named = c.master_id(survivors)
                    if named is not None and named != master:
                        new_master, new_master_s = named, time.perf_counter() - killed
                if new_master is not None and all_advanced(before, shard_offsets(poller, [new_master] + survivors)):
                    resume_s = time.perf_counter() - killed
                    break
                if time.perf_counter() - killed > 60:
                    raise BenchError(f"no resume within 60 s of killing aggregator-{master} "
                                     f"(new master: {new_master})")
                time.sleep(0.05)
            report.add(Figure("failover.master_kill.new_master", new_master_s, "s",
                              note=f"aggregator-{new_master} named by a survivor"))
            report.add(Figure("failover.master_kill.resume", resume_s, "s",
                              target=Target("<=", FAILOVER_TARGET_S),
                              note=f"new master and every shard's offset moved on; producer put "
                                   f"{producer.put:,} records, {producer.failed:,} failed"))
        finally:
            producer.stop()
            poller.close()
    if producer.failed and producer.last_error:
        log(f"   producer errors (last: {producer.last_error})")


def scenario_raft(args, report: Report) -> None:
    require_tool(args.bin_dir, "bench-raft")  # before starting a cluster for it

    def run(extra: list[str]) -> dict:
        # Aggregators only: bench-raft registers as the one leaf, so it is assigned every task.
        with Cluster(args.bin_dir, 3, 0) as c:
            grpc = ",".join(f"127.0.0.1:{c.grpc_port(i)}" for i in range(1, c.aggregators + 1))
            return run_json_tool(args.bin_dir, "bench-raft",
                                 ["--aggregators", grpc, "--tasks", str(RAFT_TASKS),
                                  "--seconds", str(RAFT_SECONDS)] + extra)

    def note(out: dict) -> str:
        return (f"{out.get('commits'):,} batch commits in {float(out.get('seconds', 0)):.1f} s, "
                f"{out.get('nodes')} nodes, {out.get('tasks')} concurrent tasks, "
                f"{out.get('calls_in_flight')} calls in flight of up to {out.get('batches_per_call')} batches, "
                f"p50 {float(out.get('p50_ms', 0)):.1f} ms, p99 {float(out.get('p99_ms', 0)):.1f} ms")

    # The reference: the same commits with one CommitBatches call per batch (how leaves sent
    # them before they grouped them), in the same run on the same machine.
    single = run(["--calls-in-flight", str(RAFT_TASKS), "--batches-per-call", "1"])
    report.add(Figure("raft.commits.call_per_batch", float(single["commits_per_sec"]), "commits/s",
                      note=note(single)))
    out = run([])  # as the leaves commit
    report.add(Figure(
        "raft.commits", float(out["commits_per_sec"]), "commits/s", target=Target(">=", 5000),
        ceiling=float(single["commits_per_sec"]), ceiling_label="ref(call per batch)",
        ratio_label="speed-up", note=note(out)))


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    def positive(text: str) -> int:
        value = int(text.replace(",", "").replace("_", ""))
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
        return value

    def scenarios(text: str) -> list[str]:
        names = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [s for s in names if s not in SCENARIOS]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
        return names

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin-dir", type=Path, default=REPO / "target/release",
                   help="aggregator, leaf, kinesis-sim and bench-* binaries (default target/release)")
    p.add_argument("--only", type=scenarios, default=list(SCENARIOS), metavar="SCENARIO[,..]",
                   help=f"scenarios to run, of {', '.join(SCENARIOS)} (default all)")
    p.add_argument("--rows", type=positive, default=1_000_000, help="datagen rows (default 1,000,000)")
    p.add_argument("--kinesis-records", type=positive, default=60_000,
                   help="records pre-loaded for the Kinesis ingest scenario (default 60,000)")
    p.add_argument("--kinesis-rounds", type=positive, default=5,
                   help="pipelines of the Kinesis scenario, each between two drains; the figure "
                        "is the round with the median ratio (default 5)")
    p.add_argument("--latency-samples", type=positive, default=200, help="latency probes (default 200)")
    p.add_argument("--out", type=Path, help="also write every figure to this file as JSON")
    args = p.parse_args(argv)
    args.bin_dir = args.bin_dir.resolve()
    if args.rows < DATAGEN_TASKS:
        p.error(f"--rows must be at least {DATAGEN_TASKS}")
    return args


def header(args) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout)
    except ValueError:
        nproc = os.cpu_count() or 0
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": nproc,
        "commit": commit.stdout.strip() or "unknown",
        "bin_dir": str(args.bin_dir),
        "options": {"only": args.only, "rows": args.rows, "kinesis_records": args.kinesis_records,
                    "kinesis_rounds": args.kinesis_rounds,
                    "latency_samples": args.latency_samples},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    head = header(args)
    print(f"# shardline bench {head['date']}  nproc {head['nproc']}  commit {head['commit']}  "
          f"bin-dir {head['bin_dir']}", flush=True)
    report = Report()
    selected = set(args.only)
    with contextlib.ExitStack() as stack:
        # datagen and query share one cluster: the query scenario reads the rows datagen loaded.
        shared: dict[str, Cluster] = {}

        def gen_cluster() -> Cluster:
            if "gen" not in shared:
                shared["gen"] = stack.enter_context(Cluster(args.bin_dir, 1, 2))
            return shared["gen"]

        if "datagen" in selected:
            report.run("datagen", lambda: scenario_datagen(args, report, gen_cluster))
        if "storage" in selected:
            report.run("storage", lambda: scenario_storage(args, report, gen_cluster))
        if "query" in selected:
            report.run("query", lambda: scenario_query(args, report, gen_cluster))
    runners = {
        "kinesis": scenario_kinesis,
        "latency": scenario_latency,
        "failover": scenario_failover,
        "raft": scenario_raft,
    }
    for name, fn in runners.items():
        if name in selected:
            report.run(name, lambda fn=fn: fn(args, report))
    report.summary()
    if args.out:
        args.out.write_text(json.dumps(report.to_json(head), indent=2) + "\n")
        log(f"figures written to {args.out}")
    return 0 if all(why is None for why in report.outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
