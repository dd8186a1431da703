//! The storage ceiling: rows shaped like a datagen pipeline's (topic, id, JSON record) written
//! into sled by a plain loop, in batches of `--batch` rows, each batch flushed like a commit;
//! one sled entry per row, or (`--group N`) runs of N rows per entry as the leaves store them
//! (a tag, the row count, each row's end offset, the rows).

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

/// A run of rows as one value: tag 0x01, the count (u32 LE), end offsets (u32 LE), the rows.
fn group_value(rows: &[String]) -> Vec<u8> {
    let mut out = vec![0x01];
    out.extend_from_slice(&(rows.len() as u32).to_le_bytes());
    let mut end = 0u32;
    for r in rows {
        end += r.len() as u32;
        out.extend_from_slice(&end.to_le_bytes());
    }
    for r in rows {
        out.extend_from_slice(r.as_bytes());
    }
    out
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
                batch.insert(key, group_value(&run));
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
