//! The storage ceiling: rows shaped like a datagen pipeline's (topic, id, JSON record) written
//! into sled by a plain loop, in batches of `--batch` rows, each batch flushed like a commit;
//! one sled entry per row, or (`--group N`) runs of N rows per entry, encoded by the leaves' own
//! row-group encoder.

use clap::Parser;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Rows to write.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Size of the record's `msg` field (datagen.payload.bytes).
    #[arg(long, default_value_t = 32)]
    payload_bytes: usize,
    /// Rows per batch (one flush each).
    #[arg(long, default_value_t = 10_000)]
    batch: u64,
    /// Rows per sled entry (1: one entry per row).
    #[arg(long, default_value_t = 1)]
    group: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("shardline-bench-sled-{}", std::process::id()));
    let db = sled::open(&dir)?;
    let tree = db.open_tree("table/bench/gen")?;
    let msg = "x".repeat(args.payload_bytes);
    let started = Instant::now();
    let mut written = 0u64;
    while written < args.rows {
        let mut batch = sled::Batch::default();
        let n = args.batch.min(args.rows - written);
        let mut run = Vec::new();
        for i in written..written + n {
            let record = serde_json::json!({"msg": msg, "seq": i, "task": i % 2});
            let row = serde_json::json!(["gen", format!("{{\"seq\":{i}}}"), record]).to_string();
            if args.group <= 1 {
                let mut key = ((i % 16) as u32).to_be_bytes().to_vec();
                key.extend_from_slice(&i.to_be_bytes());
                batch.insert(key, row.as_bytes());
                continue;
            }
            run.push(row);
            if run.len() as u64 == args.group || i + 1 == written + n {
                let first = i + 1 - run.len() as u64;
                let mut key = (((first / args.group) % 16) as u32).to_be_bytes().to_vec();
                key.extend_from_slice(&first.to_be_bytes());
                batch.insert(
                    key,
                    leaf::store::encode_group(run.iter().map(String::as_bytes)),
                );
                run.clear();
            }
        }
        tree.apply_batch(batch)?;
        db.flush()?;
        written += n;
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(tree);
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
    bench::report(serde_json::json!({
        "rows": written,
        "seconds": seconds,
        "rows_per_sec": written as f64 / seconds,
    }));
    Ok(())
}
