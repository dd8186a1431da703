"""The scenarios on a datagen table (scripts/bench.py runs them): ingest next to its sled ceiling,
computed columns and indexes, and issue 17's storage figures (queries over column segments, a
full scan through the MySQL protocol, memory, bytes on disk, concurrent point filters)."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import threading
import time
from typing import Callable

import pymysql

from bench_common import (  # scripts/ is on sys.path
    BenchError, CeilingError, Cluster, DATAGEN_TASKS, Figure, INGEST_BATCH_SIZE, ROW_GROUP_ROWS,
    Report, Target, children_cpu_seconds, count_rows, cpu_seconds, log, measure_ceiling,
    peak_rss, percentile, prepare_database, query, reset_peak_rss, run_json_tool, wait_until,
)


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
    client_before = children_cpu_seconds()
    lean = run_json_tool(args.bin_dir, "bench-mysql-scan", ["--port", str(c.port(1)), "SELECT * FROM d.gen"])
    lean_rows, lean_s = int(lean["rows"]), float(lean["seconds"])
    server_cpu = {n: cpu_seconds(c.pid(n)) - before[n] for n in nodes}
    client_cpu = children_cpu_seconds() - client_before
    if lean_rows != rows:
        raise BenchError(f"bench-mysql-scan read {lean_rows:,} rows of {rows:,}")
    mariadb = shutil.which("mariadb") or shutil.which("mysql")
    mariadb_note = "no mariadb client"
    if mariadb:
        started, client_before = time.perf_counter(), children_cpu_seconds()
        proc = subprocess.Popen([mariadb, "-h127.0.0.1", f"-P{c.port(1)}", "-uroot", "--quick", "--batch",
                                 "--skip-column-names", "-e", "SELECT * FROM d.gen"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        c_rows = 0
        while chunk := proc.stdout.read(1 << 20):
            c_rows += chunk.count(b"\n")
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise RuntimeError(f"mariadb SELECT * failed: {err.strip()}")
        c_s = time.perf_counter() - started
        mariadb_note = (f"mariadb client (--quick, to a pipe): {c_rows / c_s:,.0f} rows/s, its own CPU "
                        f"{1e6 * (children_cpu_seconds() - client_before) / max(c_rows, 1):.2f} us/row")
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
                           f"{1e6 * client_cpu / max(lean_rows, 1):.2f} us/row, the "
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
