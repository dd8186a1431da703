//! The chaos suite: a continuous ingest over several Kinesis shards (our simulator, AWS limits on)
//! while a seeded schedule of faults runs: SIGKILL and restart of random leaves, SIGKILL of the
//! master, a leaf frozen past the heartbeat timeout and resumed, shard splits and merges, a
//! follower aggregator whose disk is wiped (refused, then replaced: REMOVE AGGREGATOR, ADD
//! AGGREGATOR, a new node), and DROP PIPELINE + DROP TABLE + the pipeline created again. At the
//! end every record put is in the table exactly once, the offsets are each shard's last sequence
//! number (ended shards may be forgotten once a child committed) and the pipeline is Running. Throughout, the simulator fails 3% of the reads
//! (GetRecords and GetShardIterator; not ListShards, which START PIPELINE needs) with
//! STOP_ON_ERROR OFF and one retry per batch, and answers every shard's first reads with empty
//! pages.
//!
//! Profiles: `chaos_suite` (CI, `SHARDLINE_CHAOS_FAULTS`, default 12) and `chaos_suite_long`
//! (100 faults; `cargo test -p integration-tests -- --ignored chaos_suite_long --nocapture`).
//! `SHARDLINE_CHAOS_SEED` replays a schedule.

use crate::harness::{signal, wait_for, Cluster, ClusterSpec, Moto};
use crate::pipelines::{
    count, create_pipeline_sql, create_stream, pipeline_cluster, put_entries, runtime, START,
};
use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const STREAM: &str = "chaos-suite";
const DB: &str = "chaos_suite";
const PIPELINE: &str = "chaos_suite_pipeline";
const HEARTBEAT_TIMEOUT_MS: u64 = 1500;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillLeaf,
    KillMaster,
    FreezeLeaf,
    Split,
    Merge,
    /// A follower's data directory is wiped: it must refuse to start under its old id, and is
    /// replaced through the documented procedure (REMOVE AGGREGATOR, ADD AGGREGATOR, a new node).
    ReplaceWipedAggregator,
    /// DROP PIPELINE and DROP TABLE, then the same pipeline created again from TRIM_HORIZON:
    /// the new table gets every record once, none of the old table's rows.
    DropAndRecreate,
}

const ALL: [Fault; 7] = [
    Fault::KillLeaf,
    Fault::KillMaster,
    Fault::FreezeLeaf,
    Fault::Split,
    Fault::Merge,
    Fault::ReplaceWipedAggregator,
    Fault::DropAndRecreate,
];

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

#[test]
fn chaos_suite() -> Result<()> {
    run(env_u64("SHARDLINE_CHAOS_FAULTS").unwrap_or(12) as usize)
}

#[test]
#[ignore = "long profile: 100 faults, several minutes"]
fn chaos_suite_long() -> Result<()> {
    run(env_u64("SHARDLINE_CHAOS_FAULTS").unwrap_or(100) as usize)
}

/// A producer that puts records until told to stop, retrying what Kinesis refused (throttling,
/// a shard closed by a reshard between list and put), like a real producer.
async fn produce(
    client: aws_sdk_kinesis::Client,
    stop: Arc<AtomicBool>,
) -> Result<Vec<(String, String)>> {
    let mut put = Vec::new();
    let mut next = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let mut pending: Vec<(String, Vec<u8>)> = (next..next + 100)
            .map(|i| {
                (
                    format!("key-{}", rand::random::<u32>()),
                    format!(r#"{{"n":{i}}}"#).into_bytes(),
                )
            })
            .collect();
        next += pending.len();
        let mut attempts = 0;
        while !pending.is_empty() {
            attempts += 1;
            if attempts > 200 {
                bail!("records refused 200 times in a row");
            }
            let entries = put_entries(&pending)?;
            // A refused call (throttled, a shard closing under the put) is retried as a whole.
            if let Ok(r) = client
                .put_records()
                .stream_name(STREAM)
                .set_records(Some(entries))
                .send()
                .await
            {
                let mut retry = Vec::new();
                for (entry, rec) in r.records().iter().zip(pending.drain(..)) {
                    match (entry.shard_id(), entry.sequence_number()) {
                        (Some(shard), Some(seq)) if entry.error_code().is_none() => {
                            put.push((shard.to_string(), seq.to_string()))
                        }
                        _ => retry.push(rec),
                    }
                }
                pending = retry;
            }
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(put)
}

/// Open shards of a stream: (id, starting hash key, ending hash key), by hash key.
pub(crate) async fn open_shards(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Result<Vec<(String, u128, u128)>> {
    let mut out: Vec<(String, u128, u128)> = crate::pipelines::list_all_shards(client, stream)
        .await?
        .into_iter()
        .filter(|(_, closed, _, _)| !closed)
        .map(|(id, _, lo, hi)| (id, lo, hi))
        .collect();
    out.sort_by_key(|s| s.1);
    Ok(out)
}

fn run(total_faults: usize) -> Result<()> {
    let seed = env_u64("SHARDLINE_CHAOS_SEED").unwrap_or_else(rand::random);
    println!("chaos: {total_faults} faults, seed {seed} (SHARDLINE_CHAOS_SEED={seed} replays)");
    let mut rng = StdRng::seed_from_u64(seed);
    // Reads fail now and then (the pipeline skips, never parks: STOP_ON_ERROR OFF), and every
    // shard answers its first reads with empty pages, closed ones too.
    let sim = Moto::sim(&[
        "--error-rate",
        "0.03",
        "--error-ops",
        "GetRecords,GetShardIterator",
        "--empty-pages",
        "2",
    ])?;
    let rt = runtime();
    let kinesis = sim.client();
    let (mut c, m) = pipeline_cluster(
        &sim,
        ClusterSpec {
            leaves: 3,
            metrics: true,
            aggregator_args: vec![
                "--leaf-heartbeat-timeout-ms".into(),
                HEARTBEAT_TIMEOUT_MS.to_string(),
            ],
            // Rows move into column segments (and segments merge) all along, under the faults.
            leaf_env: vec![
                ("SHARDLINE_SEGMENT_ROWS".into(), "200".into()),
                ("SHARDLINE_FLUSH_INTERVAL_MS".into(), "200".into()),
            ],
            ..Default::default()
        },
        DB,
    )?;
    let out = faults_then_check(&mut c, m, &rt, &kinesis, &mut rng, total_faults);
    if out.is_err() {
        c.failed();
    }
    out
}

/// Creates the pipeline (STOP_ON_ERROR OFF, one retry per batch) and starts it.
fn create_and_start(c: &Cluster, m: usize) -> Result<()> {
    c.sql(
        m,
        &format!("USE {DB}; {}", create_pipeline_sql(PIPELINE, STREAM, 4)),
    )?;
    c.sql(
        m,
        &format!("USE {DB}; ALTER PIPELINE {PIPELINE} SET STOP_ON_ERROR OFF; ALTER PIPELINE {PIPELINE} SET MAX_RETRIES_PER_BATCH_PARTITION 1"),
    )?;
    c.sql(m, &format!("USE {DB}; START PIPELINE {PIPELINE}"))?;
    Ok(())
}

/// Wipes a follower aggregator's data directory and restarts it: it must refuse to start.
/// Then replaces it: REMOVE AGGREGATOR, ADD AGGREGATOR under a new id, the new node started
/// with a new directory, which must catch up.
fn replace_wiped_aggregator(c: &mut Cluster, rng: &mut StdRng) -> Result<String> {
    let m = c.wait_for_master(START)?;
    let followers: Vec<usize> = (0..c.aggregators.len())
        .filter(|i| *i != m && c.aggregators[*i].is_running())
        .collect();
    let old = followers[rng.gen_range(0..followers.len())];
    c.aggregators[old].kill();
    std::fs::remove_dir_all(c.aggregators[old].data_dir())?;
    // Its config lists the members of now (the ones it was started with may be gone).
    c.refresh_peers(old);
    c.aggregators[old].start()?;
    let code = c.wait_for_exit(old, Duration::from_secs(30))?;
    if code == Some(0) || !c.aggregators[old].log_text().contains("REMOVE AGGREGATOR") {
        bail!("the wiped aggregator-{} did not refuse to start", old + 1);
    }
    let t = Instant::now();
    let new = c.replace_aggregator(m, old)?;
    let new_id = new + 1;
    let mut last_error = String::new();
    let answered = wait_for("the new aggregator to answer", START, || {
        match c.sql(new, &format!("SELECT COUNT(*) FROM {DB}.{PIPELINE}")) {
            Ok(_) => Some(()),
            Err(e) => {
                last_error = e.to_string();
                None
            }
        }
    });
    if answered.is_err() {
        bail!("the new aggregator-{new_id} does not answer: {last_error}");
    }
    Ok(format!(
        "wiped aggregator-{} refused to start; replaced by aggregator-{new_id} in {:.1} s",
        old + 1,
        t.elapsed().as_secs_f64()
    ))
}

/// Starts the pipeline and the producer, runs the fault schedule, then checks exactly-once.
fn faults_then_check(
    c: &mut Cluster,
    m: usize,
    rt: &tokio::runtime::Runtime,
    kinesis: &aws_sdk_kinesis::Client,
    rng: &mut StdRng,
    total_faults: usize,
) -> Result<()> {
    rt.block_on(create_stream(kinesis, STREAM, 4))?;
    create_and_start(c, m)?;

    let stop = Arc::new(AtomicBool::new(false));
    let producer = rt.spawn(produce(kinesis.clone(), stop.clone()));
    let started = Instant::now();
    // Every kind once (in a random order), then random kinds.
    let mut schedule: Vec<Fault> = ALL.to_vec();
    for i in (1..schedule.len()).rev() {
        schedule.swap(i, rng.gen_range(0..=i));
    }
    while schedule.len() < total_faults {
        schedule.push(ALL[rng.gen_range(0..ALL.len())]);
    }
    schedule.truncate(total_faults.max(1));
    let mut done: BTreeMap<Fault, usize> = BTreeMap::new();
    let mut master_elections = Vec::new();
    // DROP PIPELINE forgets a pipeline's errors: the ones of dropped incarnations are counted
    // just before their drop.
    let mut dropped_errors = 0usize;
    for (n, fault) in schedule.iter().enumerate() {
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..1500)));
        let at = started.elapsed().as_secs_f64();
        let what = match fault {
            Fault::KillLeaf => {
                let i = rng.gen_range(0..c.leaves.len());
                c.leaves[i].kill();
                // Sometimes back before the heartbeat timeout, sometimes after its tasks moved.
                let down = rng.gen_range(200..3000);
                std::thread::sleep(Duration::from_millis(down));
                c.leaves[i].start()?;
                format!("SIGKILL leaf-{}, restarted after {down} ms", i + 1)
            }
            Fault::KillMaster => {
                let old = c.wait_for_master(START)?;
                c.aggregators[old].kill();
                let t = Instant::now();
                let new = c.wait_for_master(START)?;
                let elected = t.elapsed();
                master_elections.push(elected);
                c.aggregators[old].start()?;
                format!(
                    "SIGKILL master aggregator-{}; aggregator-{} master after {:.1} s",
                    old + 1,
                    new + 1,
                    elected.as_secs_f64()
                )
            }
            Fault::FreezeLeaf => {
                let i = rng.gen_range(0..c.leaves.len());
                let pid = c.leaves[i].pid().expect("leaf running");
                let port = c.leaves[i]
                    .arg("--listen")
                    .and_then(|a| a.rsplit(':').next())
                    .expect("leaf --listen")
                    .to_string();
                signal(pid, "STOP")?;
                let t = Instant::now();
                let m = c.wait_for_master(START)?;
                let offline = wait_for(
                    "the frozen leaf to be declared offline",
                    Duration::from_secs(20),
                    || {
                        let states = c.leaf_states(m).ok()?;
                        states
                            .iter()
                            .any(|(p, s)| p == &port && s == "offline")
                            .then_some(t.elapsed())
                    },
                );
                std::thread::sleep(Duration::from_millis(500));
                signal(pid, "CONT")?;
                format!(
                    "SIGSTOP leaf-{} for {:.1} s (offline after {:.1} s), SIGCONT",
                    i + 1,
                    t.elapsed().as_secs_f64(),
                    offline?.as_secs_f64()
                )
            }
            Fault::ReplaceWipedAggregator => replace_wiped_aggregator(c, rng)?,
            Fault::DropAndRecreate => {
                let m = c.wait_for_master(START)?;
                let before = count(c, m, DB, PIPELINE).unwrap_or(0);
                let errors = source_errors(c, m)?;
                dropped_errors += errors;
                c.sql(
                    m,
                    &format!("USE {DB}; DROP PIPELINE {PIPELINE}; DROP TABLE {PIPELINE}"),
                )?;
                create_and_start(c, m)?;
                format!("DROP PIPELINE + DROP TABLE at {before} rows and {errors} errors, created again")
            }
            Fault::Split | Fault::Merge => {
                let shards = rt.block_on(open_shards(kinesis, STREAM))?;
                let adjacent = shards
                    .windows(2)
                    .filter(|w| w[0].2.checked_add(1) == Some(w[1].1))
                    .map(|w| (w[0].0.clone(), w[1].0.clone()))
                    .collect::<Vec<_>>();
                let merge = (*fault == Fault::Merge || shards.len() >= 8)
                    && !adjacent.is_empty()
                    && shards.len() > 2;
                if merge {
                    let (a, b) = &adjacent[rng.gen_range(0..adjacent.len())];
                    rt.block_on(
                        kinesis
                            .merge_shards()
                            .stream_name(STREAM)
                            .shard_to_merge(a)
                            .adjacent_shard_to_merge(b)
                            .send(),
                    )?;
                    format!("MergeShards {a} + {b}")
                } else {
                    let (id, lo, hi) = &shards[rng.gen_range(0..shards.len())];
                    let mid = lo + (hi - lo) / 2 + 1;
                    rt.block_on(
                        kinesis
                            .split_shard()
                            .stream_name(STREAM)
                            .shard_to_split(id)
                            .new_starting_hash_key(mid.to_string())
                            .send(),
                    )?;
                    format!("SplitShard {id} at {mid}")
                }
            }
        };
        *done.entry(*fault).or_default() += 1;
        println!("  fault {:>3} at {at:>6.1} s: {what}", n + 1);
    }
    stop.store(true, Ordering::Relaxed);
    let put = rt.block_on(producer)??;
    let last_put = Instant::now();
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, c.leaves.len(), START)?;
    wait_for(
        &format!("{} rows", put.len()),
        Duration::from_secs(180),
        || (count(c, m, DB, PIPELINE)? >= put.len()).then_some(()),
    )?;
    let caught_up = last_put.elapsed();
    // Let any in-flight batch settle, then check.
    std::thread::sleep(Duration::from_secs(2));
    let shards = put
        .iter()
        .map(|(s, _)| s.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    println!(
        "chaos: faults {} {:?}; records {} over {shards} shards; all visible {:.1} s after the last put; elections {:?}; total {:.1} s",
        schedule.len(),
        done,
        put.len(),
        caught_up.as_secs_f64(),
        master_elections,
        started.elapsed().as_secs_f64()
    );
    let closed = rt.block_on(crate::pipelines::closed_shards(kinesis, STREAM))?;
    crate::pipelines::assert_exactly_once_resharded(c, m, DB, PIPELINE, &put, &closed)?;
    let states = c.sql(
        m,
        "SELECT PIPELINE_NAME, STATE FROM information_schema.PIPELINES",
    )?;
    assert_eq!(
        states.rows,
        vec![vec![PIPELINE.to_string(), "Running".to_string()]],
        "no pipeline in Error"
    );
    // Per-shard lag (MillisBehindLatest) is exported by the leaves reading the shards.
    let lag_samples: usize = c
        .leaf_metrics_ports()
        .iter()
        .filter_map(|p| crate::harness::scrape(*p).ok())
        .map(|t| {
            t.lines()
                .filter(|l| l.starts_with("shardline_source_lag_millis{"))
                .count()
        })
        .sum();
    assert!(lag_samples > 0, "no shardline_source_lag_millis samples");
    println!("chaos: duplicates 0, missing 0, offsets = last sequence number per shard");
    // The injected read failures reached the pipeline (and were skipped past, not fatal), in
    // this incarnation or in one dropped along the way.
    let errors = source_errors(c, m)?;
    println!(
        "chaos: {errors} source errors recorded in PIPELINES_ERRORS, {dropped_errors} more before DROP PIPELINE"
    );
    assert!(
        errors + dropped_errors > 0,
        "the simulator's injected read failures reached no task"
    );
    Ok(())
}

/// The pipeline's rows in `information_schema.PIPELINES_ERRORS`.
fn source_errors(c: &Cluster, m: usize) -> Result<usize> {
    Ok(c.sql(
        m,
        &format!("SELECT COUNT(*) FROM information_schema.PIPELINES_ERRORS WHERE PIPELINE_NAME = '{PIPELINE}'"),
    )?
    .rows[0][0]
        .parse()?)
}
