//! What a Raft snapshot of the catalog costs, and what of it the Raft driver pays.
//!
//! Builds a catalog the way the cluster does (commands applied): `--pipelines` running pipelines
//! of `--tasks` tasks over `--shards` Kinesis shards each, with `--batches` committed batches per
//! pipeline kept in PIPELINES_BATCHES_SUMMARY (`pipelines_batches_metadata_to_keep`), and prints
//! the snapshot's size, the time to encode it (what the driver paid for every snapshot before:
//! it encoded inside its loop; now a blocking thread does) and the time to copy the catalog
//! (what the driver pays now), best of `--rounds`.
//!
//! `cargo run --release -p common --example snapshot_cost -- --batches 1000000`

use common::catalog::pipelines::{BatchCommit, OffsetUpdate, PipelineDef};
use common::catalog::{Catalog, Command};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn apply(c: &mut Catalog, command: Command) {
    if let Err(e) = c.apply(command) {
        panic!("building the catalog: {e}");
    }
}

fn main() {
    let pipelines = arg("--pipelines", 4);
    let tasks = arg("--tasks", 4) as u32;
    let shards = arg("--shards", 64);
    let batches = arg("--batches", 1000);
    let rounds = arg("--rounds", 5);
    let mut c = Catalog::default();
    for i in 0..3 {
        apply(
            &mut c,
            Command::RegisterLeaf {
                address: format!("10.0.0.{i}:7201"),
                now_ms: 1,
                holding: None,
            },
        );
    }
    for (name, value) in [
        (
            "experimental_features_config",
            "kafka_connect_enabled=true".to_string(),
        ),
        ("pipelines_batches_metadata_to_keep", batches.to_string()),
    ] {
        apply(
            &mut c,
            Command::SetVariable {
                name: name.into(),
                value,
            },
        );
    }
    apply(
        &mut c,
        Command::CreateDatabase {
            name: "d".into(),
            partitions: Some(24),
            if_not_exists: false,
            now_ms: 2,
        },
    );
    let started = Instant::now();
    for p in 1..=pipelines {
        let name = format!("p{p}");
        let config: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            r#"{"connector.class":"com.singlestore.kafka.connect.kinesis.KinesisSourceConnector","kinesis.stream":"s","kafka.topic":"t","tasks.max":4}"#,
        )
        .unwrap_or_default();
        apply(
            &mut c,
            Command::CreatePipeline {
                def: PipelineDef {
                    database: "d".into(),
                    name: name.clone(),
                    connector: "kafka-connector".into(),
                    config,
                    credentials: "{}".into(),
                    table: name.clone(),
                    inferred: true,
                    batch_interval_ms: None,
                    max_retries: None,
                    stop_on_error: None,
                },
                or_replace: false,
                if_not_exists: false,
                now_ms: 3,
            },
        );
        apply(
            &mut c,
            Command::StartPipeline {
                database: "d".into(),
                name: name.clone(),
                tasks: vec![BTreeMap::new(); tasks as usize],
                if_not_running: false,
                now_ms: 4,
            },
        );
        let mut epochs = Vec::new();
        for t in 0..tasks {
            let epoch = match c.apply(Command::AssignTask {
                pipeline_id: p,
                task_id: t,
                leaf: Some(common::ids::LeafId(u64::from(t) % 3 + 1)),
            }) {
                Ok(common::catalog::Output::Epoch(e)) => e,
                other => panic!("assigning a task: {other:?}"),
            };
            epochs.push(epoch);
        }
        // Each batch moves one shard of its task (shards spread over the tasks by number).
        let mut last: BTreeMap<u64, String> = BTreeMap::new();
        for n in 0..batches.max(shards) {
            let shard = n % shards;
            let task = (shard % u64::from(tasks)) as u32;
            let key = format!(r#"{{"shardId":"shardId-{shard:012}"}}"#);
            let to = format!("4967342557749725999925894881{:028}", n);
            let from = last
                .insert(shard, to.clone())
                .map(|f| serde_json::json!({ "sequenceNumber": f }));
            let batch = BatchCommit {
                pipeline_id: p,
                task_id: task,
                epoch: epochs[task as usize],
                seq: n + 1,
                offsets: vec![OffsetUpdate {
                    key,
                    from,
                    to: serde_json::json!({ "sequenceNumber": to }),
                    finished: false,
                    continues: vec![],
                }],
                start_ms: 1_764_600_000_000 + n,
                extractor_wait_ms: 3,
                batch_time_ms: 40,
                rows: 10_000,
                bytes: 1_200_000,
                num_partitions: 8,
            };
            apply(&mut c, Command::CommitBatch(batch.clone()));
            // Finalized at once, as live leaves confirm within a second.
            apply(
                &mut c,
                Command::BatchesFinalized {
                    batches: vec![batch.batch_ref()],
                },
            );
        }
    }
    let built = started.elapsed();
    let mut encode = Duration::MAX;
    let mut copy = Duration::MAX;
    let mut size = 0;
    for _ in 0..rounds.max(1) {
        let t = Instant::now();
        let bytes = serde_json::to_vec(&c).expect("encode");
        encode = encode.min(t.elapsed());
        size = bytes.len();
        let t = Instant::now();
        let copied = c.clone();
        copy = copy.min(t.elapsed());
        drop(copied);
    }
    let summaries: usize = c.pipelines.values().map(|p| p.batches.len()).sum();
    println!(
        "catalog: {pipelines} pipelines x {tasks} tasks x {shards} shards, {summaries} batch summaries kept (built in {:.1} s)",
        built.as_secs_f64()
    );
    println!(
        "snapshot: {:.1} MB; encode {:.1} ms (the driver's cost per snapshot before); copy {:.1} ms (its cost now); {:.1}x less on the driver",
        size as f64 / 1e6,
        encode.as_secs_f64() * 1e3,
        copy.as_secs_f64() * 1e3,
        encode.as_secs_f64() / copy.as_secs_f64().max(1e-9)
    );
}
