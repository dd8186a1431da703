//! The source ceiling: every shard of a stream read from TRIM_HORIZON to its newest record with
//! plain GetRecords calls (one reader per shard, all at once), with the SDK the leaves use.

use anyhow::Context;
use aws_sdk_kinesis::types::ShardIteratorType;
use clap::Parser;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    endpoint: String,
    #[arg(long)]
    stream: String,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Records per GetRecords call (AWS allows up to 10,000; the connector defaults to 500).
    #[arg(long, default_value_t = 10_000)]
    limit: i32,
}

async fn drain(
    client: aws_sdk_kinesis::Client,
    stream: String,
    shard: String,
    limit: i32,
) -> anyhow::Result<u64> {
    let mut iterator = client
        .get_shard_iterator()
        .stream_name(&stream)
        .shard_id(&shard)
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await?
        .shard_iterator
        .context("no shard iterator")?;
    let mut n = 0u64;
    loop {
        let out = client
            .get_records()
            .shard_iterator(&iterator)
            .limit(limit)
            .send()
            .await?;
        let got = out.records().len() as u64;
        n += got;
        let caught_up = got == 0 || out.millis_behind_latest == Some(0) && got < limit as u64;
        match out.next_shard_iterator {
            Some(next) if !caught_up => iterator = next,
            _ => return Ok(n),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = common::connect::kinesis::sdk_client(
        Some(&args.endpoint),
        &args.region,
        "test",
        "test",
        None,
    );
    let shards = client
        .list_shards()
        .stream_name(&args.stream)
        .send()
        .await?
        .shards
        .unwrap_or_default();
    let started = Instant::now();
    let readers: Vec<_> = shards
        .iter()
        .map(|s| {
            tokio::spawn(drain(
                client.clone(),
                args.stream.clone(),
                s.shard_id.clone(),
                args.limit,
            ))
        })
        .collect();
    let mut records = 0;
    for r in readers {
        records += r.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    bench::report(serde_json::json!({
        "records": records,
        "shards": shards.len(),
        "seconds": seconds,
        "records_per_sec": records as f64 / seconds,
    }));
    Ok(())
}
