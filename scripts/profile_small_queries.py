#!/usr/bin/env python3
"""Where a small query's time goes: a release cluster (1 aggregator, 2 leaves) with the bench's
10,000-row table, 32 clients running JSON point filters, and `perf record` (cpu-clock samples,
call graphs) on every node meanwhile; prints each node's hottest functions (self and children).

    .venv/bin/python scripts/profile_small_queries.py [--bin-dir target/release] [--seconds 10]

A developer's tool, not a test: perf must be installed (Debian's linux-perf)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bench  # noqa: E402
import bench_storage  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bin-dir", type=Path, default=bench.REPO / "target/release")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-perf", action="store_true", help="only the CPU per query (perf's own cost is not in it)")
    p.add_argument("--shape-each", action="store_true",
                   help="every statement a shape of its own: planned in full, no kept plan (an A/B of plan keeping)")
    p.add_argument("--out", type=Path, default=Path("/tmp/shardline-perf"),
                   help="where perf's data stays (perf report -i <out>/<node>.data)")
    args = p.parse_args()
    report = bench.Report()
    with bench.Cluster(args.bin_dir, aggregators=1, leaves=2) as c:
        nodes = ["aggregator-1", "leaf-1", "leaf-2"]
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
        # The bench's own figure first: it loads the table, then runs its clients for 1 s.
        bench_storage.concurrency(c, report, seconds=1)
        perfs = [] if args.no_perf else [subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "499", "--call-graph", "dwarf,16384", "-q",
                                   "-o", str(out / f"{n}.data"), "-p", str(c.pid(n))],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for n in nodes]
        time.sleep(0.5)
        before = {n: bench.cpu_seconds(c.pid(n)) for n in nodes}
        client_before = time.process_time()
        plans_before = plan_counts(c)
        queries = run_clients(c, report, args.seconds, shape_each=args.shape_each)
        reused, built = (a - b for a, b in zip(plan_counts(c), plans_before))
        print(f"aggregator plans: {reused:,.0f} bound into kept plans, {built:,.0f} planned in full")
        used = {n: bench.cpu_seconds(c.pid(n)) - before[n] for n in nodes}
        used["clients (this process)"] = time.process_time() - client_before
        print("CPU per query: " + ", ".join(f"{n} {1e3 * v / max(queries, 1):.2f} ms"
                                            for n, v in used.items()))
        for proc in perfs:
            proc.send_signal(2)
        for proc in perfs:
            proc.wait(timeout=60)
        for n in ([] if args.no_perf else nodes):
            print(f"\n== {n}")
            text = subprocess.run(["perf", "report", "-i", str(out / f"{n}.data"), "--stdio",
                                   "--no-children", "--percent-limit", "1", "-g", "none",
                                   "--sort", "symbol"],
                                  capture_output=True, text=True).stdout
            lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
            print("\n".join(lines[:args.top]))


def plan_counts(c: bench.Cluster) -> tuple[float, float]:
    """The aggregator's SELECTs bound into kept plans and planned in full, so far."""
    m = bench.LeafMetrics([c.metrics_port])  # the aggregator's /metrics, read the same way
    try:
        return (m.total("shardline_select_plans_reused_total"),
                m.total("shardline_select_plans_built_total"))
    finally:
        m.close()


def run_clients(c: bench.Cluster, report: bench.Report, seconds: float, clients: int = 32,
                shape_each: bool = False) -> int:
    latencies, wall = bench_storage.point_filter_clients(c, clients, seconds, shape_each)
    print(f"{clients} clients: {len(latencies) / wall:,.0f} q/s, p50 "
          f"{bench.percentile(latencies, 50):.1f} ms, p99 {bench.percentile(latencies, 99):.1f} ms")
    return len(latencies)


if __name__ == "__main__":
    main()
