//! Ceilings the benchmark (`scripts/bench.py`, see BENCHMARKS.md) measures next to Shardline's
//! own figures, each a binary printing one JSON line:
//! - `bench-sled`: the raw write rate of pipeline-shaped rows into sled by a plain loop;
//! - `bench-kinesis-drain`: a plain GetRecords drain of a stream with the same SDK;
//! - `bench-raft`: batch commits through a real aggregator group, driven by a stand-in leaf.

/// Prints a figure as one JSON line on stdout.
pub fn report(value: serde_json::Value) {
    println!("{value}");
}
