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
import json
import os
import subprocess
import sys
from pathlib import Path

from bench_common import DATAGEN_TASKS, REPO, SCENARIOS, Cluster, Report, log  # scripts/ is on sys.path
from bench_storage import scenario_datagen, scenario_query, scenario_storage
from bench_streams import scenario_failover, scenario_kinesis, scenario_latency, scenario_raft

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
