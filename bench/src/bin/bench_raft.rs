//! Batch-commit throughput of a real aggregator group: this program stands in for a leaf. It
//! registers, heartbeats, creates a database and a pipeline with `--tasks` tasks through the
//! master's `Propose` RPC, waits until the master assigns it every task, then commits batches
//! for every task at once (each moving that task's offset forward) for `--seconds`, through
//! the leaves' own `Committer`: the batches waiting are sent together in one `CommitBatches`
//! call. Every commit is a Raft entry replicated to the group and fsynced; concurrent
//! commits share a Raft ready (group commit).

use anyhow::{bail, Context, Result};
use clap::Parser;
use common::catalog::pipelines::{BatchCommit, OffsetUpdate, PipelineDef};
use common::catalog::Command;
use proto::aggregator_client::AggregatorClient;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// gRPC addresses of the aggregators, comma-separated.
    #[arg(long)]
    aggregators: String,
    /// Concurrent tasks committing batches.
    #[arg(long, default_value_t = 64)]
    tasks: u32,
    /// How long to commit.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// `CommitBatches` calls in flight at once (the leaves use `leaf::commits::CALLS_IN_FLIGHT`).
    #[arg(long, default_value_t = leaf::commits::CALLS_IN_FLIGHT)]
    calls_in_flight: usize,
    /// Batches in one call at most (1: a call per batch, as leaves did before `CommitBatches`).
    #[arg(long, default_value_t = leaf::commits::MAX_BATCHES_PER_CALL)]
    batches_per_call: usize,
    /// The address this stand-in leaf registers with (never dialled).
    #[arg(long, default_value = "bench-leaf.invalid:1")]
    address: String,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn connect(addr: &str) -> Result<AggregatorClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(AggregatorClient::new(channel)
        .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(proto::MAX_MESSAGE_BYTES))
}

/// The master's client, found by asking each aggregator who leads.
async fn master(addrs: &[String]) -> Result<AggregatorClient<Channel>> {
    for _ in 0..100 {
        for a in addrs {
            let Ok(mut c) = connect(a).await else {
                continue;
            };
            if let Ok(s) = c.status(proto::StatusRequest {}).await {
                let s = s.into_inner();
                if s.role == "Leader" {
                    return Ok(c);
                }
                if !s.leader_address.is_empty() {
                    if let Ok(c) = connect(&s.leader_address).await {
                        return Ok(c);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("no master aggregator among {addrs:?}")
}

async fn propose(c: &mut AggregatorClient<Channel>, cmd: &Command) -> Result<serde_json::Value> {
    let reply = c
        .propose(proto::ProposeRequest {
            command: serde_json::to_vec(cmd)?,
        })
        .await
        .map_err(|s| anyhow::anyhow!("propose: {}", s.message()))?;
    let result: serde_json::Value = serde_json::from_slice(&reply.into_inner().result)?;
    if let Some(err) = result.get("Err") {
        bail!("proposing a catalog command failed: {err}");
    }
    Ok(result)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let addrs: Vec<String> = args
        .aggregators
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let mut m = master(&addrs).await?;
    let leaf_id = m
        .register_leaf(proto::RegisterLeafRequest {
            address: args.address.clone(),
            fresh: true,
            holding: vec![],
        })
        .await
        .map_err(|s| anyhow::anyhow!("register: {}", s.message()))?
        .into_inner()
        .leaf_id;
    // Heartbeats keep the stand-in online and bring its assignments.
    let (tx, mut assignments) = tokio::sync::watch::channel(Vec::<proto::TaskAssignment>::new());
    let stop = Arc::new(AtomicBool::new(false));
    {
        let mut m = m.clone();
        let stop = stop.clone();
        let address = args.address.clone();
        tokio::spawn(async move {
            // As a leaf does: the table list comes once per change, not in every answer, and
            // the offsets as changes to what the stand-in holds.
            let mut tables_generation = 0;
            let mut offsets = leaf::offsets::OffsetCache::default();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = m
                    .heartbeat(proto::HeartbeatRequest {
                        leaf_id,
                        address: address.clone(),
                        tables_generation,
                        offsets_seen: offsets.seen(),
                    })
                    .await
                {
                    let mut r = r.into_inner();
                    if let Some(live) = r.live_tables {
                        tables_generation = live.generation;
                    }
                    offsets.merge(&mut r.tasks);
                    let _ = tx.send(r.tasks);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    propose(
        &mut m,
        &Command::SetVariable {
            name: "experimental_features_config".into(),
            value: format!("{}=true", common::catalog::KAFKA_CONNECT_FLAG),
        },
    )
    .await?;
    let db = format!("raftbench{}", now_ms());
    propose(
        &mut m,
        &Command::CreateDatabase {
            name: db.clone(),
            partitions: Some(1),
            if_not_exists: false,
            now_ms: now_ms(),
        },
    )
    .await?;
    let mut config = serde_json::Map::new();
    config.insert(
        "connector.class".into(),
        common::connect::datagen::CLASS.into(),
    );
    config.insert("tasks.max".into(), args.tasks.into());
    propose(
        &mut m,
        &Command::CreatePipeline {
            def: PipelineDef {
                database: db.clone(),
                name: "rb".into(),
                connector: "bench".into(),
                config,
                credentials: "{}".into(),
                table: "rb".into(),
                inferred: true,
                batch_interval_ms: None,
                max_retries: None,
                stop_on_error: None,
            },
            or_replace: false,
            if_not_exists: false,
            now_ms: now_ms(),
        },
    )
    .await?;
    propose(
        &mut m,
        &Command::StartPipeline {
            database: db.clone(),
            name: "rb".into(),
            tasks: (0..args.tasks)
                .map(|i| BTreeMap::from([("task".to_string(), i.to_string())]))
                .collect(),
            if_not_running: false,
            now_ms: now_ms(),
        },
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let tasks = loop {
        let now: Vec<_> = assignments
            .borrow_and_update()
            .iter()
            .filter(|t| t.database == db)
            .cloned()
            .collect();
        if now.len() == args.tasks as usize {
            break now;
        }
        if Instant::now() > deadline {
            bail!(
                "the master assigned {} of {} tasks in 30 s",
                now.len(),
                args.tasks
            );
        }
        assignments.changed().await?;
    };

    // One committer for every task, as a leaf has.
    let committer = leaf::commits::Committer::start(
        leaf::client::MasterClient::new(addrs.clone()),
        args.calls_in_flight,
        args.batches_per_call,
    );
    let started = Instant::now();
    let end = started + Duration::from_secs(args.seconds);
    let workers: Vec<_> = tasks
        .into_iter()
        .map(|t| {
            let committer = committer.clone();
            tokio::spawn(async move {
                let key = format!("{{\"task\":{}}}", t.task_id);
                let mut from: Option<serde_json::Value> = None;
                let mut latencies = Vec::new();
                let mut seq = 0u64;
                while Instant::now() < end {
                    seq += 1;
                    let to = serde_json::json!({ "seq": seq * 10_000 });
                    let batch = BatchCommit {
                        pipeline_id: t.pipeline_id,
                        task_id: t.task_id,
                        epoch: t.epoch,
                        seq,
                        offsets: vec![OffsetUpdate {
                            key: key.clone(),
                            from: from.clone(),
                            to: to.clone(),
                            finished: false,
                            continues: vec![],
                        }],
                        start_ms: now_ms(),
                        extractor_wait_ms: 0,
                        batch_time_ms: 0,
                        rows: 10_000,
                        bytes: 1_000_000,
                        num_partitions: 1,
                    };
                    let t0 = Instant::now();
                    let r = committer
                        .commit(leaf::commits::to_proto(&batch))
                        .await
                        .map_err(|e| anyhow::anyhow!("commit: {e}"))?;
                    if r.status() != proto::BatchStatus::Committed {
                        bail!("batch not committed ({:?}): {}", r.status(), r.reason);
                    }
                    latencies.push(t0.elapsed());
                    from = Some(to);
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    bench::report(serde_json::json!({
        "commits": latencies.len(),
        "seconds": seconds,
        "commits_per_sec": latencies.len() as f64 / seconds,
        "tasks": args.tasks,
        "nodes": addrs.len(),
        "calls_in_flight": args.calls_in_flight,
        "batches_per_call": args.batches_per_call,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
    }));
    Ok(())
}
