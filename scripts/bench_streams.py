"""The scenarios on Kinesis streams and the cluster (scripts/bench.py runs them): pipeline ingest
next to a plain drain, end-to-end latency, failover after a leaf's kill, Raft batch commits."""

from __future__ import annotations

import json
import random
import statistics
import time

from bench_common import (  # scripts/ is on sys.path
    BenchError, CeilingError, Cluster, DRAIN_RECORD_LIMIT, FAILOVER_TARGET_S, Figure,
    INGEST_BATCH_SIZE, KINESIS_RECORD_LIMIT, LATENCY_TARGET_MS, MAX_BATCH_INTERVAL_MS,
    PRODUCER_RATE, Poller, Producer, RAFT_SECONDS, RAFT_TASKS, Report, Target, count_rows,
    create_kinesis_pipeline, create_stream, log, measure_ceiling, percentile,
    pipeline_diagnosis, prepare_database, put_records, query, require_tool, run_json_tool,
    wait_for_loaded_rows, wait_for_rows, wait_until,
)


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
