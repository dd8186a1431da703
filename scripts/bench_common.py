"""The benchmark's machinery (scripts/bench.py runs it): figures, ceilings and the report; a
cluster of real processes on free ports; SQL, pipeline and Kinesis helpers; the `bench` crate's
tools; the processes' CPU time and memory."""
from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
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


# Processes

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's children that have ended, so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = math.ceil(len(ordered) * p / 100)
    return ordered[min(len(ordered), max(1, rank)) - 1]
