//! Exactly-once and liveness outside the chaos suite's fault model: sequences that once lost,
//! doubled or stalled records (each test names the sequence; they failed before their fixes).

use crate::harness::{wait_for, Cluster, ClusterSpec, Moto};
use crate::pipelines::{
    assert_exactly_once, count, create_pipeline_sql, create_stream, datagen_config,
    pipeline_cluster, put_records, runtime, setup, START,
};
use anyhow::Result;
use std::time::Duration;

mod frozen;

/// The table ids a leaf stores rows of (its Status call).
fn stored_tables(c: &Cluster, leaf: usize) -> Option<Vec<u64>> {
    let addr = c.leaves[leaf].arg("--listen")?.to_string();
    runtime().block_on(async move {
        let mut client = proto::leaf_client::LeafClient::connect(format!("http://{addr}"))
            .await
            .ok()?;
        let status = client.status(proto::StatusRequest {}).await.ok()?;
        Some(status.into_inner().stored_tables)
    })
}

/// A Kinesis simulator started with `args`, and a cluster of one aggregator and one leaf that
/// reaches it, with `db` created: (simulator, runtime, client, cluster, master).
fn one_leaf_on_sim(
    args: &[&str],
    db: &str,
) -> Result<(
    Moto,
    tokio::runtime::Runtime,
    aws_sdk_kinesis::Client,
    Cluster,
    usize,
)> {
    let sim = Moto::sim(args)?;
    let rt = runtime();
    let kinesis = sim.client();
    let (c, m) = pipeline_cluster(
        &sim,
        ClusterSpec {
            aggregators: 1,
            leaves: 1,
            ..Default::default()
        },
        db,
    )?;
    Ok((sim, rt, kinesis, c, m))
}

/// Waits until the table holds as many rows as records were put, then checks each is there
/// exactly once and the offsets are each shard's last.
pub(crate) fn all_loaded_once(
    c: &Cluster,
    m: usize,
    db: &str,
    table: &str,
    put: &[(String, String)],
) -> Result<()> {
    wait_for(
        &format!("{} rows", put.len()),
        Duration::from_secs(60),
        || (count(c, m, db, table)? >= put.len()).then_some(()),
    )
    .inspect_err(|_| c.failed())?;
    std::thread::sleep(Duration::from_secs(1));
    assert_exactly_once(c, m, db, table, put)
}

/// [`all_loaded_once`] on a resharded stream: the `closed` shards may have no offset left.
fn all_loaded_once_resharded(
    c: &Cluster,
    m: usize,
    (db, table): (&str, &str),
    put: &[(String, String)],
    closed: &std::collections::BTreeSet<String>,
) -> Result<()> {
    wait_for(
        &format!("{} rows", put.len()),
        Duration::from_secs(60),
        || (count(c, m, db, table)? >= put.len()).then_some(()),
    )
    .inspect_err(|_| c.failed())?;
    std::thread::sleep(Duration::from_secs(1));
    crate::pipelines::assert_exactly_once_resharded(c, m, db, table, put, closed)
}

/// A cluster of `spec` with a master, every leaf online and `db` created (pipeline variables
/// set), and the master's index.
fn ready_cluster(spec: ClusterSpec, db: &str) -> Result<(Cluster, usize)> {
    let mut c = Cluster::start(spec)?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, c.leaves.len(), START)?;
    setup(&c, m, db)?;
    Ok((c, m))
}

/// Creates pipeline `gen` (datagen, two tasks of `per_task` records) into table `gen`.
fn create_datagen(c: &Cluster, m: usize, db: &str, per_task: usize) -> Result<()> {
    c.sql(
        m,
        &format!(
            "USE {db}; CREATE INFERRED PIPELINE gen AS LOAD DATA KAFKACONNECT 'datagen' CONFIG '{}' FORMAT AVRO",
            datagen_config(per_task)
        ),
    )?;
    Ok(())
}

/// Scenario 1: DROP TABLE and DROP DATABASE delete the rows on every leaf, also on one that
/// was down during the DROP; a table created again under the same name starts empty. Before,
/// only the catalog forgot the table: the re-created pipeline's table counted 2N rows.
#[test]
fn a_dropped_table_or_database_never_comes_back() -> Result<()> {
    let (mut c, m) = ready_cluster(
        ClusterSpec {
            aggregators: 1,
            ..Default::default()
        },
        "dropped",
    )?;
    let per_task = 100;
    create_datagen(&c, m, "dropped", per_task)?;
    c.sql(m, "USE dropped; START PIPELINE gen FOREGROUND")?;
    assert_eq!(count(&c, m, "dropped", "gen"), Some(2 * per_task));
    let first = stored_tables(&c, 0).unwrap_or_default();

    c.sql(m, "USE dropped; DROP PIPELINE gen; DROP TABLE gen")?;
    create_datagen(&c, m, "dropped", per_task)?;
    c.sql(m, "USE dropped; START PIPELINE gen FOREGROUND")?;
    assert_eq!(
        count(&c, m, "dropped", "gen"),
        Some(2 * per_task),
        "a table created again under a dropped one's name shows only its own rows"
    );
    // The first table's rows are gone from the disks, not just hidden.
    wait_for("the dropped table's storage to go", START, || {
        let now: Vec<u64> = (0..2)
            .flat_map(|l| stored_tables(&c, l).unwrap_or_default())
            .collect();
        (!first.is_empty() && first.iter().all(|id| !now.contains(id))).then_some(())
    })?;

    // DROP DATABASE while leaf 2 is down: it deletes its rows when it returns.
    c.leaves[1].kill();
    let held = stored_tables(&c, 0).unwrap_or_default();
    c.sql(m, "DROP DATABASE dropped")?;
    c.leaves[1].start()?;
    c.wait_for_leaves_online(m, 2, START)?;
    c.sql(m, "CREATE DATABASE dropped")?;
    create_datagen(&c, m, "dropped", per_task)?;
    c.sql(m, "USE dropped; START PIPELINE gen FOREGROUND")?;
    assert_eq!(
        count(&c, m, "dropped", "gen"),
        Some(2 * per_task),
        "a database created again under a dropped one's name shows only its own rows"
    );
    wait_for("the dropped database's storage to go", START, || {
        let now: Vec<u64> = (0..2)
            .flat_map(|l| stored_tables(&c, l).unwrap_or_default())
            .collect();
        (now.len() == 2 && held.iter().all(|id| !now.contains(id))).then_some(())
    })?;
    assert!(c.leaves[1]
        .log_text()
        .contains("removed the storage of dropped tables"));
    Ok(())
}

/// Scenario 3: a task whose offsets are older than its own last commit (here a fault hook makes
/// a running task forget its commits once, as a task restarted from an old assignment after a
/// failover does) has its next batch refused (offset conflict). The refused batch's rows go, the
/// task resyncs from the committed offsets and carries on: every record once. Before, the
/// refused batch parked the task for good while the pipeline showed Running.
#[test]
fn a_refused_batch_resyncs_from_the_committed_offsets() -> Result<()> {
    let flags = tempfile::tempdir()?;
    let flag = flags.path().join("stale-once");
    let (c, m) = ready_cluster(
        ClusterSpec {
            aggregators: 1,
            leaves: 1,
            leaf_env: vec![(
                "SHARDLINE_TEST_STALE_OFFSETS_ONCE".into(),
                flag.to_string_lossy().into(),
            )],
            ..Default::default()
        },
        "refused",
    )?;
    c.sql(m, "SET GLOBAL pipelines_extractor_batch_size = 50")?;
    create_datagen(&c, m, "refused", 400)?;
    c.sql(m, "USE refused; START PIPELINE gen")?;
    wait_for("every record", Duration::from_secs(60), || {
        (count(&c, m, "refused", "gen")? >= 800).then_some(())
    })
    .inspect_err(|_| c.failed())?;
    std::thread::sleep(Duration::from_secs(1));
    assert!(flag.exists(), "the fault fired");
    assert!(
        c.leaves[0]
            .log_text()
            .contains("resyncing from the committed offsets"),
        "a batch was refused and the task resynced"
    );
    let rows = c
        .sql(
            m,
            "SELECT COUNT(*), COUNT(DISTINCT record) FROM refused.gen",
        )?
        .rows;
    assert_eq!(rows, vec![vec!["800".to_string(), "800".to_string()]]);
    Ok(())
}

/// Scenario 4: a batch the master committed stays in the table when the pipeline is dropped
/// before its leaf (dead between commit and finalize) returns. Before, the returning leaf
/// heard "not committed" (the pipeline was gone) and deleted rows the table had counted.
#[test]
fn a_committed_batch_survives_drop_pipeline() -> Result<()> {
    committed_batch_survives("dropp", "STOP PIPELINE gen; DROP PIPELINE gen")
}

/// The same when the pipeline is only stopped (which forgets its tasks and their epochs).
#[test]
fn a_batch_committed_just_before_a_crash_survives_a_stopped_pipeline() -> Result<()> {
    committed_batch_survives("crash", "STOP PIPELINE gen")
}

/// A leaf exits right after the master committed its first batch, before making it visible;
/// `then` runs on the pipeline; the leaf comes back. Every answer is complete or an error, never
/// short, and it becomes complete: the leaf settles the batch as committed before it serves.
fn committed_batch_survives(db: &str, then: &str) -> Result<()> {
    let mut c = Cluster::start(ClusterSpec {
        aggregators: 1,
        ..Default::default()
    })?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, 2, START)?;
    c.leaves[1].kill();
    c.leaves[1].set_env("SHARDLINE_TEST_EXIT_BEFORE_FINALIZE", Some("1"));
    c.leaves[1].start()?;
    c.wait_for_leaves_online(m, 2, START)?;
    setup(&c, m, db)?;
    create_datagen(&c, m, db, 100)?;
    c.sql(m, &format!("USE {db}; START PIPELINE gen"))?;
    wait_for(
        "the leaf to exit after its commit",
        Duration::from_secs(30),
        || (!c.leaves[1].is_running()).then_some(()),
    )?;
    assert!(c.leaves[1].log_text().contains("exiting after a commit"));
    wait_for("both tasks' offsets", Duration::from_secs(30), || {
        c.sql(
            m,
            "SELECT COUNT(*) FROM information_schema.PIPELINES_SOURCE_OFFSETS WHERE PIPELINE_NAME = 'gen'",
        )
        .ok()
        .and_then(|o| (o.rows[0][0] == "2").then_some(()))
    })?;
    c.sql(m, &format!("USE {db}; {then}"))?;
    c.leaves[1].set_env("SHARDLINE_TEST_EXIT_BEFORE_FINALIZE", None);
    c.leaves[1].start()?;
    wait_for("all 200 rows", Duration::from_secs(30), || {
        let n = count(&c, m, db, "gen");
        assert!(matches!(n, None | Some(200)), "a short answer: {n:?}");
        n.map(|_| ())
    })?;
    assert!(c.leaves[1].log_text().contains("committed=true"));
    Ok(())
}

/// Scenario 2: transient source errors, many more than the retry budget over the pipeline's
/// life, with STOP_ON_ERROR OFF: every record loads exactly once and the pipeline stays
/// Running. Before, the budget never reset: the second failure of a task (days apart or not)
/// was fatal, and the task then waited forever while the pipeline showed Running.
#[test]
fn transient_errors_spread_over_time_never_park_a_task() -> Result<()> {
    // One read in five fails, at random (expected: a dozen failures or more over the run; the
    // test needs at least three). The test's own calls, and the ListShards that START PIPELINE
    // plans with, are not failed.
    let (_sim, rt, kinesis, c, m) = one_leaf_on_sim(
        &[
            "--error-rate",
            "0.2",
            "--error-ops",
            "GetRecords,GetShardIterator",
        ],
        "budget",
    )?;
    rt.block_on(create_stream(&kinesis, "budget-stream", 2))?;
    c.sql(
        m,
        &format!(
            "USE budget; {}",
            create_pipeline_sql("budget_pipeline", "budget-stream", 2)
        ),
    )?;
    c.sql(
        m,
        "USE budget; ALTER PIPELINE budget_pipeline SET MAX_RETRIES_PER_BATCH_PARTITION 1; ALTER PIPELINE budget_pipeline SET STOP_ON_ERROR OFF",
    )?;
    c.sql(m, "USE budget; START PIPELINE budget_pipeline")?;
    let mut put = Vec::new();
    for round in 0..30 {
        let payloads: Vec<(String, Vec<u8>)> = (0..20)
            .map(|i| (format!("k{round}-{i}"), format!("{round}-{i}").into_bytes()))
            .collect();
        put.extend(rt.block_on(put_records(&kinesis, "budget-stream", &payloads))?);
        std::thread::sleep(Duration::from_millis(250));
    }
    let errors = |c: &Cluster| -> usize {
        c.sql(m, "SELECT COUNT(*) FROM information_schema.PIPELINES_ERRORS WHERE PIPELINE_NAME = 'budget_pipeline'")
            .ok()
            .and_then(|o| o.rows[0][0].parse().ok())
            .unwrap_or(0)
    };
    all_loaded_once(&c, m, "budget", "budget_pipeline", &put)?;
    println!("errors recorded: {}", errors(&c));
    assert!(
        errors(&c) >= 3,
        "the source failed more often than a lifetime budget of 1 retry allows"
    );
    let state = c
        .sql(m, "SELECT STATE FROM information_schema.PIPELINES WHERE PIPELINE_NAME = 'budget_pipeline'")?
        .rows;
    assert_eq!(state, vec![vec!["Running".to_string()]]);
    Ok(())
}

/// Scenario 6: a closed shard whose first pages are empty (AWS may answer so before data) is
/// read to its end before its children; only a null NextShardIterator ends it. Before, an
/// empty first page of a closed shard marked it finished unread, losing its records.
#[test]
fn a_closed_shard_with_empty_first_pages_is_read_whole() -> Result<()> {
    let (_sim, rt, kinesis, c, m) = one_leaf_on_sim(&["--empty-pages", "3"], "empty")?;
    rt.block_on(create_stream(&kinesis, "empty-stream", 1))?;
    let batch = |from: usize| -> Vec<(String, Vec<u8>)> {
        (from..from + 100)
            .map(|i| (format!("key-{i}"), format!("{i}").into_bytes()))
            .collect()
    };
    let mut put = rt.block_on(put_records(&kinesis, "empty-stream", &batch(0)))?;
    // Closed before the pipeline ever reads it.
    rt.block_on(async {
        kinesis
            .split_shard()
            .stream_name("empty-stream")
            .shard_to_split("shardId-000000000000")
            .new_starting_hash_key("170141183460469231731687303715884105728")
            .send()
            .await
    })?;
    put.extend(rt.block_on(put_records(&kinesis, "empty-stream", &batch(100)))?);
    c.sql(
        m,
        &format!(
            "USE empty; {}",
            create_pipeline_sql("empty_pipeline", "empty-stream", 2)
        ),
    )?;
    c.sql(m, "USE empty; START PIPELINE empty_pipeline")?;
    let closed = rt.block_on(crate::pipelines::closed_shards(&kinesis, "empty-stream"))?;
    all_loaded_once_resharded(&c, m, ("empty", "empty_pipeline"), &put, &closed)
}

/// Scenario 5: a pipeline that starts at LATEST keeps the start position it took, however often
/// its task restarts before the first commit. Before, every restart asked Kinesis for LATEST
/// again, and the records that arrived while the task was down were skipped.
#[test]
fn latest_is_decided_once_however_often_the_task_restarts() -> Result<()> {
    let (_sim, rt, kinesis, mut c, m) = one_leaf_on_sim(&[], "latest")?;
    rt.block_on(create_stream(&kinesis, "latest-stream", 1))?;
    let batch = |tag: &str| -> Vec<(String, Vec<u8>)> {
        (0..30)
            .map(|i| (format!("{tag}-{i}"), format!("{tag}-{i}").into_bytes()))
            .collect()
    };
    // Before the pipeline starts: not its to read.
    rt.block_on(put_records(&kinesis, "latest-stream", &batch("before")))?;
    let sql = create_pipeline_sql("latest_pipeline", "latest-stream", 1).replace(
        "\"tasks.max\": 1",
        "\"tasks.max\": 1, \"kinesis.position\": \"LATEST\"",
    );
    assert!(sql.contains("LATEST"));
    c.sql(m, &format!("USE latest; {sql}"))?;
    c.sql(m, "USE latest; START PIPELINE latest_pipeline")?;
    wait_for("the task to start", START, || {
        c.leaves[0]
            .log_text()
            .contains("starting task")
            .then_some(())
    })?;
    // Time for the task to take its position (nothing to commit: no record yet).
    std::thread::sleep(Duration::from_secs(1));
    c.leaves[0].kill();
    let mut put = rt.block_on(put_records(&kinesis, "latest-stream", &batch("between")))?;
    c.leaves[0].start()?;
    c.wait_for_leaves_online(m, 1, START)?;
    put.extend(rt.block_on(put_records(&kinesis, "latest-stream", &batch("after")))?);
    all_loaded_once(&c, m, "latest", "latest_pipeline", &put)
}

/// Bounds: START PIPELINE ... FOREGROUND LIMIT n BATCHES with n above
/// `pipelines_batches_metadata_to_keep` stops after n batches. Before, it counted the bounded
/// batch history, never reached n, and ran until the source was exhausted.
#[test]
fn foreground_limit_counts_past_the_kept_batch_history() -> Result<()> {
    let (c, m) = ready_cluster(
        ClusterSpec {
            aggregators: 1,
            leaves: 1,
            ..Default::default()
        },
        "limit",
    )?;
    c.sql(m, "SET GLOBAL pipelines_batches_metadata_to_keep = 3")?;
    c.sql(m, "SET GLOBAL pipelines_extractor_batch_size = 10")?;
    let per_task = 5000;
    create_datagen(&c, m, "limit", per_task)?;
    c.sql(
        m,
        "USE limit; START PIPELINE gen FOREGROUND LIMIT 8 BATCHES",
    )?;
    let rows = count(&c, m, "limit", "gen").unwrap_or(0);
    println!("FOREGROUND LIMIT 8 BATCHES of at most 10 rows loaded {rows} rows");
    assert!(rows >= 8, "at least 8 batches: {rows} rows");
    assert!(
        rows < 2 * per_task,
        "stopped after the limit, not at the source's end: {rows} rows"
    );
    let kept = c
        .sql(m, "SELECT COUNT(*) FROM information_schema.PIPELINES_BATCHES_SUMMARY WHERE PIPELINE_NAME = 'gen'")?
        .rows;
    assert_eq!(kept[0][0], "3", "the history stays bounded");
    Ok(())
}

/// Bounds: a stream resharded again and again. The catalog forgets an ended shard's offset
/// once a child of it has committed (the shard stays ended for the tasks: a shard with a
/// committed descendant is done), so the offsets held grow with the open shards, not with every
/// shard the stream ever had; and a heartbeat answer carries the offsets committed since the
/// leaf's last, so an idle leaf's heartbeat is smaller than the offsets it holds. Before, every
/// closed shard stayed in the catalog, and in every heartbeat (4 a second per leaf), for good.
#[test]
fn a_stream_resharded_many_times_keeps_offsets_of_open_shards_only() -> Result<()> {
    let sim = Moto::sim(&["--no-limits"])?;
    let rt = runtime();
    let kinesis = sim.client();
    let (c, m) = pipeline_cluster(
        &sim,
        ClusterSpec {
            aggregators: 1,
            leaves: 1,
            metrics: true,
            ..Default::default()
        },
        "reshards",
    )?;
    let stream = "reshards-stream";
    let open_at_start = 16;
    rt.block_on(create_stream(&kinesis, stream, open_at_start))?;
    c.sql(
        m,
        &format!(
            "USE reshards; {}",
            create_pipeline_sql("reshards_pipeline", stream, 1)
        ),
    )?;
    c.sql(m, "USE reshards; START PIPELINE reshards_pipeline")?;
    let mut put = Vec::new();
    let batch = |round: usize, step: &str| -> Vec<(String, Vec<u8>)> {
        (0..40)
            .map(|i| {
                let tag = format!("{round}-{step}-{i}");
                (tag.clone(), tag.into_bytes())
            })
            .collect()
    };
    put.extend(rt.block_on(put_records(&kinesis, stream, &batch(0, "first")))?);
    let rounds = 8;
    for round in 0..rounds {
        // Split an open shard in two, then merge the two back: three shards closed.
        rt.block_on(async {
            let shards = crate::chaos::open_shards(&kinesis, stream).await?;
            let (id, lo, hi) = shards.first().cloned().expect("an open shard");
            kinesis
                .split_shard()
                .stream_name(stream)
                .shard_to_split(&id)
                .new_starting_hash_key((lo + (hi - lo) / 2).to_string())
                .send()
                .await?;
            put.extend(put_records(&kinesis, stream, &batch(round, "split")).await?);
            let children: Vec<String> = crate::chaos::open_shards(&kinesis, stream)
                .await?
                .into_iter()
                .filter(|(_, l, h)| *l >= lo && *h <= hi)
                .map(|(id, _, _)| id)
                .collect();
            assert_eq!(children.len(), 2, "the split's children: {children:?}");
            kinesis
                .merge_shards()
                .stream_name(stream)
                .shard_to_merge(&children[0])
                .adjacent_shard_to_merge(&children[1])
                .send()
                .await?;
            put.extend(put_records(&kinesis, stream, &batch(round, "merge")).await?);
            anyhow::Ok(())
        })?;
    }
    // Enough records that every shard open now holds some: each merged shard commits, and
    // the catalog can forget its parents.
    let last: Vec<(String, Vec<u8>)> = (0..800)
        .map(|i| (format!("last-{i}"), format!("last-{i}").into_bytes()))
        .collect();
    put.extend(rt.block_on(put_records(&kinesis, stream, &last))?);
    let closed = rt.block_on(crate::pipelines::closed_shards(&kinesis, stream))?;
    assert_eq!(closed.len(), 3 * rounds);
    all_loaded_once_resharded(&c, m, ("reshards", "reshards_pipeline"), &put, &closed)?;
    let offsets = c
        .sql(m, "SELECT `KEY`, `VALUE` FROM information_schema.PIPELINES_SOURCE_OFFSETS WHERE PIPELINE_NAME = 'reshards_pipeline'")?
        .rows;
    let offsets_bytes: usize = offsets.iter().map(|r| r[0].len() + r[1].len()).sum();
    // Idle now: what a heartbeat answer carries is the assignment, not the offsets.
    std::thread::sleep(Duration::from_secs(1));
    let leaf_metrics = c.metrics_ports[c.aggregators.len()];
    let text = crate::harness::scrape(leaf_metrics)?;
    assert!(
        text.contains("shardline_heartbeat_response_bytes "),
        "the leaf reports its heartbeat size"
    );
    let heartbeat = crate::harness::metric_sum(&text, "shardline_heartbeat_response_bytes");
    println!(
        "{} shards over the stream's life, {} open; {} source partitions with an offset, {offsets_bytes} bytes; an idle heartbeat answer {heartbeat} bytes",
        open_at_start as usize + closed.len(),
        open_at_start,
        offsets.len()
    );
    // The open shards, and at most the last merge's parents (kept until the merged shard
    // commits a record of its own).
    assert!(
        offsets.len() <= open_at_start as usize + 2,
        "ended shards are kept: {} offsets for {open_at_start} open shards",
        offsets.len()
    );
    assert!(
        (heartbeat as usize) < offsets_bytes,
        "the heartbeat carries every offset: {heartbeat} bytes >= {offsets_bytes}"
    );
    Ok(())
}

/// Scenario 2, a batch that can never load: with STOP_ON_ERROR OFF, once its retries are spent
/// the batch is skipped (its offsets move past its records, which are not loaded; its error is
/// in PIPELINES_ERRORS) and the records after it load. Before, the task stopped for good after
/// the last retry while the pipeline showed Running.
#[test]
fn a_batch_that_never_loads_is_skipped_and_the_task_goes_on() -> Result<()> {
    let sim = Moto::sim(&[])?;
    let rt = runtime();
    let kinesis = sim.client();
    let mut leaf_env = sim.leaf_env();
    leaf_env.push(("SHARDLINE_TEST_POISON_KEY".into(), "poison".into()));
    let (c, m) = ready_cluster(
        ClusterSpec {
            aggregators: 1,
            leaves: 1,
            leaf_env,
            ..Default::default()
        },
        "skip",
    )?;
    rt.block_on(create_stream(&kinesis, "skip-stream", 1))?;
    c.sql(
        m,
        &format!(
            "USE skip; {}",
            create_pipeline_sql("skip_pipeline", "skip-stream", 1)
        ),
    )?;
    c.sql(
        m,
        "USE skip; ALTER PIPELINE skip_pipeline SET MAX_RETRIES_PER_BATCH_PARTITION 1; ALTER PIPELINE skip_pipeline SET STOP_ON_ERROR OFF",
    )?;
    c.sql(m, "USE skip; START PIPELINE skip_pipeline")?;
    let records = |tag: &str| -> Vec<(String, Vec<u8>)> {
        (0..10)
            .map(|i| (format!("{tag}-{i}"), format!("{tag}-{i}").into_bytes()))
            .collect()
    };
    let mut put = rt.block_on(put_records(&kinesis, "skip-stream", &records("before")))?;
    all_loaded_once(&c, m, "skip", "skip_pipeline", &put)?;
    let poison = rt.block_on(put_records(
        &kinesis,
        "skip-stream",
        &[("poison".to_string(), b"never loads".to_vec())],
    ))?;
    let errors = |c: &Cluster| -> usize {
        c.sql(m, "SELECT COUNT(*) FROM information_schema.PIPELINES_ERRORS WHERE PIPELINE_NAME = 'skip_pipeline'")
            .ok()
            .and_then(|o| o.rows[0][0].parse().ok())
            .unwrap_or(0)
    };
    wait_for("the batch's failures", START, || {
        (errors(&c) >= 2).then_some(())
    })?;
    put.extend(rt.block_on(put_records(&kinesis, "skip-stream", &records("after")))?);
    // Every record but the poison one, once; the offsets past it.
    wait_for(
        &format!("{} rows", put.len()),
        Duration::from_secs(60),
        || (count(&c, m, "skip", "skip_pipeline")? >= put.len()).then_some(()),
    )
    .inspect_err(|_| c.failed())?;
    let keys = c
        .sql(m, "SELECT JSON_EXTRACT_STRING(id, 'partitionKey') FROM skip.skip_pipeline WHERE JSON_EXTRACT_STRING(id, 'partitionKey') = 'poison'")?
        .rows;
    assert!(
        keys.is_empty(),
        "the skipped record was not loaded: {keys:?}"
    );
    let mut all = put.clone();
    all.extend(poison);
    let offsets = crate::pipelines::offsets(&c, m, "skip_pipeline")?;
    let last = all
        .iter()
        .map(|(_, s)| s.clone())
        .max_by_key(|s| (s.len(), s.clone()));
    assert_eq!(
        offsets.values().next().cloned(),
        last,
        "the offset is the shard's last"
    );
    assert_eq!(count(&c, m, "skip", "skip_pipeline"), Some(put.len()));
    let state = c
        .sql(
            m,
            "SELECT STATE FROM information_schema.PIPELINES WHERE PIPELINE_NAME = 'skip_pipeline'",
        )?
        .rows;
    assert_eq!(state, vec![vec!["Running".to_string()]]);
    Ok(())
}

/// Bounds: the committed batches the catalog keeps for a leaf until it confirms them visible
/// go when that leaf comes back without them (its disk wiped, here right after a commit it
/// never finalized): it registers saying what it holds. Before, they stayed in the catalog (and
/// its snapshots) for good.
#[test]
fn a_leaf_back_with_a_wiped_disk_leaves_no_committed_batch_behind() -> Result<()> {
    let mut c = Cluster::start(ClusterSpec {
        aggregators: 1,
        ..Default::default()
    })?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, 2, START)?;
    c.leaves[1].kill();
    c.leaves[1].set_env("SHARDLINE_TEST_EXIT_BEFORE_FINALIZE", Some("1"));
    c.leaves[1].start()?;
    c.wait_for_leaves_online(m, 2, START)?;
    setup(&c, m, "wiped")?;
    create_datagen(&c, m, "wiped", 100)?;
    c.sql(m, "USE wiped; START PIPELINE gen")?;
    wait_for(
        "the leaf to exit after its commit",
        Duration::from_secs(30),
        || (!c.leaves[1].is_running()).then_some(()),
    )?;
    let addr = c.aggregators[m]
        .arg("--grpc-listen")
        .unwrap_or_default()
        .to_string();
    let unfinalized = || -> Option<u64> {
        let addr = addr.clone();
        runtime().block_on(async move {
            let mut client =
                proto::aggregator_client::AggregatorClient::connect(format!("http://{addr}"))
                    .await
                    .ok()?;
            let status = client.status(proto::StatusRequest {}).await.ok()?;
            Some(status.into_inner().unfinalized_batches)
        })
    };
    // The other leaf's batches are confirmed within a second; the dead one's stays.
    wait_for("only the dead leaf's committed batch kept", START, || {
        (unfinalized()? == 1).then_some(())
    })?;
    std::fs::remove_dir_all(c.leaves[1].data_dir())?;
    c.leaves[1].set_env("SHARDLINE_TEST_EXIT_BEFORE_FINALIZE", None);
    c.leaves[1].start()?;
    c.wait_for_leaves_online(m, 2, START)?;
    wait_for("the catalog to forget it", START, || {
        (unfinalized()? == 0).then_some(())
    })
    .inspect_err(|_| c.failed())?;
    Ok(())
}
