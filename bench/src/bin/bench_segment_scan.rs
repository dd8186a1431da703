//! The full-scan ceiling: every column segment under a directory (a leaf's
//! `store/segments`) decoded with DataFusion's Parquet reader stack (arrow-rs `parquet`), the
//! table's columns only, one file after another, as fast as one thread goes. Prints
//! `{"rows":..,"bytes":..,"seconds":..,"rows_per_sec":..}`.

use clap::Parser;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Directories to search for `*.parquet` files (recursively).
    dirs: Vec<PathBuf>,
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "parquet") {
            out.push(p);
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut paths = Vec::new();
    for d in &args.dirs {
        files(d, &mut paths)?;
    }
    let started = Instant::now();
    let (mut rows, mut bytes) = (0u64, 0u64);
    for path in &paths {
        let builder = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path)?)?;
        // The table's columns: those before the row id (sub-columns follow it).
        let width = builder
            .schema()
            .fields()
            .iter()
            .position(|f| f.name() == "\0row_id")
            .unwrap_or(builder.schema().fields().len());
        let mask = ProjectionMask::roots(builder.parquet_schema(), 0..width);
        for b in builder
            .with_projection(mask)
            .with_batch_size(8192)
            .build()?
        {
            let b = b?;
            rows += b.num_rows() as u64;
            bytes += b.get_array_memory_size() as u64;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "files": paths.len(),
            "rows": rows,
            "bytes": bytes,
            "seconds": seconds,
            "rows_per_sec": rows as f64 / seconds.max(1e-9),
        })
    );
    Ok(())
}
