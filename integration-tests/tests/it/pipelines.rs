//! Kafka Connect pipelines from Kinesis (moto_server) into tables, exactly once.

use crate::harness::{wait_for, Cluster, ClusterSpec, Moto};
use anyhow::{bail, Result};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

pub(crate) const START: Duration = Duration::from_secs(30);

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn spec_config(stream: &str, tasks: u32) -> String {
    format!(
        r#"{{
  "connector.class": "com.singlestore.kafka.connect.kinesis.KinesisSourceConnector",
  "aws.access.key.id": "AKIASECRETKEYID0001",
  "aws.secret.access.key": "sEcReT/aws+key=never-shown",
  "aws.session.token": "session-token-never-shown",
  "kafka.topic": "kinesis-topic",
  "kinesis.stream": "{stream}",
  "kinesis.region": "us-east-1",
  "tasks.max": {tasks}
}}"#
    )
}

pub(crate) fn create_pipeline_sql(name: &str, stream: &str, tasks: u32) -> String {
    format!(
        "CREATE INFERRED PIPELINE {name}\nAS LOAD DATA KAFKACONNECT 'kafka-connector'\nCONFIG '{}'\nCREDENTIALS '{{}}' -- AWS credentials are in CONFIG for Kinesis connector\nFORMAT AVRO;",
        spec_config(stream, tasks)
    )
}

pub(crate) async fn create_stream(
    client: &aws_sdk_kinesis::Client,
    name: &str,
    shards: i32,
) -> Result<()> {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await?;
    for _ in 0..100 {
        let s = client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await?;
        if s.stream_description_summary()
            .map(|d| d.stream_status().as_str())
            == Some("ACTIVE")
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("stream {name} never became ACTIVE")
}

/// PutRecords entries for (partition key, data) pairs.
pub(crate) fn put_entries(payloads: &[(String, Vec<u8>)]) -> Result<Vec<PutRecordsRequestEntry>> {
    Ok(payloads
        .iter()
        .map(|(key, data)| {
            PutRecordsRequestEntry::builder()
                .partition_key(key)
                .data(Blob::new(data.clone()))
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?)
}

/// Puts records; returns (shardId, sequenceNumber) of each.
pub(crate) async fn put_records(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    payloads: &[(String, Vec<u8>)],
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for chunk in payloads.chunks(100) {
        let entries = put_entries(chunk)?;
        let r = client
            .put_records()
            .stream_name(stream)
            .set_records(Some(entries))
            .send()
            .await?;
        if r.failed_record_count().unwrap_or(0) > 0 {
            bail!("put_records failed for some records");
        }
        for e in r.records() {
            out.push((
                e.shard_id().unwrap_or_default().to_string(),
                e.sequence_number().unwrap_or_default().to_string(),
            ));
        }
    }
    Ok(out)
}

/// A cluster whose leaves reach `kinesis`, once a master is elected and every leaf is online,
/// with `db` created and the pipeline variables set; returns it and the master's index.
pub(crate) fn pipeline_cluster(
    kinesis: &Moto,
    spec: ClusterSpec,
    db: &str,
) -> Result<(Cluster, usize)> {
    let mut leaf_env = kinesis.leaf_env();
    leaf_env.extend(spec.leaf_env.iter().cloned());
    let mut c = Cluster::start(ClusterSpec { leaf_env, ..spec })?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, c.leaves.len(), START)?;
    setup(&c, m, db)?;
    Ok((c, m))
}

pub(crate) fn setup(c: &Cluster, m: usize, db: &str) -> Result<()> {
    c.sql(
        m,
        r#"SET GLOBAL experimental_features_config = "kafka_connect_enabled=true""#,
    )?;
    c.sql(
        m,
        "SET GLOBAL pipelines_extractor_max_batch_interval_ms = 200",
    )?;
    c.sql(m, "SET GLOBAL pipelines_batch_interval = 100")?;
    c.sql(m, &format!("CREATE DATABASE {db}"))?;
    Ok(())
}

pub(crate) fn count(c: &Cluster, i: usize, db: &str, table: &str) -> Option<usize> {
    c.sql(i, &format!("SELECT COUNT(*) FROM {db}.{table}"))
        .ok()?
        .rows
        .first()?
        .first()?
        .parse()
        .ok()
}

pub(crate) fn loaded(
    c: &Cluster,
    i: usize,
    db: &str,
    table: &str,
) -> Result<Vec<(String, String)>> {
    Ok(c.sql(
        i,
        &format!("SELECT JSON_EXTRACT_STRING(record, 'shardId'), JSON_EXTRACT_STRING(record, 'sequenceNumber') FROM {db}.{table}"),
    )?
    .rows
    .into_iter()
    .map(|r| (r[0].clone(), r[1].clone()))
    .collect())
}

pub(crate) fn offsets(c: &Cluster, i: usize, pipeline: &str) -> Result<BTreeMap<String, String>> {
    Ok(c.sql(
        i,
        &format!("SELECT JSON_EXTRACT_STRING(`KEY`, 'shardId'), JSON_EXTRACT_STRING(`VALUE`, 'sequenceNumber') FROM information_schema.PIPELINES_SOURCE_OFFSETS WHERE PIPELINE_NAME = '{pipeline}'"),
    )?
    .rows
    .into_iter()
    .map(|r| (r[0].clone(), r[1].clone()))
    .collect())
}

/// Every put record is in the table exactly once, and the offsets are each shard's last.
pub(crate) fn assert_exactly_once(
    c: &Cluster,
    i: usize,
    db: &str,
    table: &str,
    put: &[(String, String)],
) -> Result<()> {
    assert_rows_once(c, i, db, table, put)?;
    assert_offsets_are_last(c, i, table, put)
}

/// Every put record is in the table exactly once.
fn assert_rows_once(
    c: &Cluster,
    i: usize,
    db: &str,
    table: &str,
    put: &[(String, String)],
) -> Result<()> {
    let rows = loaded(c, i, db, table)?;
    let mut seen = HashSet::new();
    let duplicates: Vec<_> = rows.iter().filter(|r| !seen.insert((*r).clone())).collect();
    let expected: HashSet<_> = put.iter().cloned().collect();
    let missing = expected.difference(&seen).count();
    let extra = seen.difference(&expected).count();
    println!(
        "rows {} put {} duplicates {} missing {missing} extra {extra}",
        rows.len(),
        put.len(),
        duplicates.len()
    );
    assert!(
        duplicates.is_empty(),
        "duplicates: {:?}",
        &duplicates[..duplicates.len().min(5)]
    );
    assert_eq!(missing, 0, "records missing");
    assert_eq!(extra, 0, "unexpected rows");
    Ok(())
}

/// The committed offsets are the last sequence number of each shard `put` wrote to.
fn assert_offsets_are_last(
    c: &Cluster,
    i: usize,
    table: &str,
    put: &[(String, String)],
) -> Result<()> {
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    for (shard, seq) in put {
        let e = last.entry(shard.clone()).or_default();
        if (seq.len(), seq.as_str()) > (e.len(), e.as_str()) {
            *e = seq.clone();
        }
    }
    // A shard that never held a record (a child merged away at once) has no sequence number.
    let committed: BTreeMap<String, String> = offsets(c, i, table)?
        .into_iter()
        .filter(|(_, seq)| !seq.is_empty() && seq != "NULL")
        .collect();
    assert_eq!(
        committed, last,
        "committed offsets are each shard's last sequence number"
    );
    Ok(())
}

/// Every shard of `stream` (all ListShards pages): (id, whether it is closed, hash key range).
pub(crate) async fn list_all_shards(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Result<Vec<(String, bool, u128, u128)>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let req = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(stream),
        };
        let r = req.send().await?;
        for s in r.shards() {
            let closed = s
                .sequence_number_range()
                .and_then(|r| r.ending_sequence_number())
                .is_some();
            let range = s.hash_key_range().expect("hash key range");
            out.push((
                s.shard_id().to_string(),
                closed,
                range.starting_hash_key().parse()?,
                range.ending_hash_key().parse()?,
            ));
        }
        token = r.next_token().map(String::from);
        if token.is_none() {
            return Ok(out);
        }
    }
}

/// The shards of `stream` that are closed (split or merged away).
pub(crate) async fn closed_shards(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Result<std::collections::BTreeSet<String>> {
    Ok(list_all_shards(client, stream)
        .await?
        .into_iter()
        .filter(|(_, closed, _, _)| *closed)
        .map(|(id, ..)| id)
        .collect())
}

/// [`assert_exactly_once`] on a stream that was resharded: the catalog forgets an ended shard's
/// offset once a child of it has committed, so each of the `closed` shards may have no offset
/// (its records are checked all the same); every other shard's is its last sequence number.
pub(crate) fn assert_exactly_once_resharded(
    c: &Cluster,
    i: usize,
    db: &str,
    table: &str,
    put: &[(String, String)],
    closed: &std::collections::BTreeSet<String>,
) -> Result<()> {
    let committed = offsets(c, i, table)?;
    let forgotten: Vec<(String, String)> = put
        .iter()
        .filter(|(shard, _)| !committed.contains_key(shard))
        .cloned()
        .collect();
    let not_closed: Vec<&String> = forgotten
        .iter()
        .map(|(s, _)| s)
        .filter(|s| !closed.contains(*s))
        .collect();
    assert!(
        not_closed.is_empty(),
        "shards still open have no committed offset: {not_closed:?}"
    );
    // Check the rows of every shard, then the offsets of the shards that still have one.
    assert_rows_once(c, i, db, table, put)?;
    let remaining: Vec<(String, String)> = put
        .iter()
        .filter(|(shard, _)| committed.contains_key(shard))
        .cloned()
        .collect();
    assert_offsets_are_last(c, i, table, &remaining)
}

#[test]
fn the_spec_example_end_to_end_with_secrets_hidden() -> Result<()> {
    let moto = Moto::start()?;
    let rt = runtime();
    let kinesis = moto.client();
    let mut c = Cluster::start(ClusterSpec {
        leaf_env: moto.leaf_env(),
        ..Default::default()
    })?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, 2, START)?;
    // Without the feature flag, pipelines are refused.
    c.sql(m, "CREATE DATABASE spec")?;
    let err = c
        .sql(
            m,
            &format!(
                "USE spec; {}",
                create_pipeline_sql("kinesis_pipeline", "kinesis-data-stream", 4)
            ),
        )
        .expect_err("flag off");
    assert!(err.to_string().contains("kafka_connect_enabled"), "{err}");
    c.sql(
        m,
        r#"SET GLOBAL experimental_features_config = "kafka_connect_enabled=true""#,
    )?;
    let shown = c
        .sql(m, "SHOW VARIABLES LIKE 'experimental_features_config'")?
        .rows;
    assert_eq!(
        shown,
        vec![vec![
            "experimental_features_config".to_string(),
            "kafka_connect_enabled=true".to_string()
        ]]
    );

    rt.block_on(create_stream(&kinesis, "kinesis-data-stream", 1))?;
    let payloads: Vec<(String, Vec<u8>)> = [
        (1, "first", "user-a"),
        (2, "second", "user-b"),
        (3, "third", "user-a"),
        (4, "fourth", "user-c"),
        (5, "fifth", "user-b"),
    ]
    .iter()
    .map(|(seq, msg, key)| {
        (
            key.to_string(),
            format!(r#"{{"seq":{seq},"msg":"{msg}"}}"#).into_bytes(),
        )
    })
    .collect();
    let put = rt.block_on(put_records(&kinesis, "kinesis-data-stream", &payloads))?;

    c.sql(
        m,
        &format!(
            "USE spec; {}",
            create_pipeline_sql("kinesis_pipeline", "kinesis-data-stream", 4)
        ),
    )?;
    let state = c.sql(m, "SELECT PIPELINE_NAME, STATE FROM information_schema.PIPELINES WHERE PIPELINE_NAME = 'kinesis_pipeline'")?.rows;
    assert_eq!(
        state,
        vec![vec!["kinesis_pipeline".to_string(), "Stopped".to_string()]]
    );
    let ddl = c
        .sql(m, "USE spec; SHOW CREATE TABLE kinesis_pipeline")?
        .rows
        .concat()
        .join("\n");
    assert!(
        ddl.contains("`topic` TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL"),
        "{ddl}"
    );
    c.sql(m, "USE spec; START PIPELINE kinesis_pipeline")?;
    let err = c
        .sql(m, "USE spec; START PIPELINE kinesis_pipeline")
        .expect_err("started twice");
    assert!(err.to_string().contains("already running"), "{err}");
    c.sql(
        m,
        "USE spec; START PIPELINE IF NOT RUNNING kinesis_pipeline",
    )?;

    let other = (m + 1) % 3;
    wait_for("5 rows", START, || {
        (count(&c, other, "spec", "kinesis_pipeline")? == 5).then_some(())
    })?;
    assert_exactly_once(&c, other, "spec", "kinesis_pipeline", &put)?;
    // The spec's queries, from a follower aggregator.
    let rows = c
        .sql(other, "USE spec; SELECT * FROM kinesis_pipeline WHERE JSON_EXTRACT_STRING(record, 'partitionKey') = 'user-c'")?
        .rows;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][0], "kinesis-topic");
    assert_eq!(rows[0][1], r#"{"partitionKey":"user-c"}"#);
    assert!(
        rows[0][2].starts_with(r#"{"approximateArrivalTimestamp":"#),
        "{}",
        rows[0][2]
    );
    assert!(rows[0][2].contains(r#""data":"eyJzZXEiOjQsIm1zZyI6ImZvdXJ0aCJ9","partitionKey":"user-c","sequenceNumber":""#), "{}", rows[0][2]);
    assert!(
        rows[0][2]
            .ends_with(r#"","shardId":"shardId-000000000000","streamName":"kinesis-data-stream"}"#),
        "{}",
        rows[0][2]
    );
    let decoded = c
        .sql(other, "USE spec; SELECT JSON_EXTRACT_BIGINT(FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')), 'seq') AS seq, JSON_EXTRACT_STRING(FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')), 'msg') AS msg FROM kinesis_pipeline WHERE JSON_EXTRACT_BIGINT(FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')), 'seq') > 3 ORDER BY seq")?
        .rows;
    assert_eq!(
        decoded,
        vec![
            vec!["4".to_string(), "fourth".to_string()],
            vec!["5".to_string(), "fifth".to_string()]
        ]
    );
    let tasks = c.sql(other, "SELECT TASK_ID, COUNT(*) as offset_count FROM information_schema.PIPELINES_SOURCE_OFFSETS WHERE PIPELINE_NAME = 'kinesis_pipeline' GROUP BY TASK_ID")?.rows;
    assert_eq!(tasks, vec![vec!["0".to_string(), "1".to_string()]]);

    // Secrets never show: not in CONFIG_JSON, SHOW CREATE PIPELINE, or any node's log.
    let config = c
        .sql(m, "SELECT CONFIG_JSON FROM information_schema.PIPELINES")?
        .rows
        .concat()
        .join(" ");
    let create = c
        .sql(m, "USE spec; SHOW CREATE PIPELINE kinesis_pipeline")?
        .rows
        .concat()
        .join(" ");
    for secret in [
        "AKIASECRETKEYID0001",
        "sEcReT/aws+key=never-shown",
        "session-token-never-shown",
    ] {
        assert!(!config.contains(secret), "CONFIG_JSON leaks {secret}");
        assert!(
            !create.contains(secret),
            "SHOW CREATE PIPELINE leaks {secret}"
        );
        for n in c.aggregators.iter().chain(c.leaves.iter()) {
            assert!(
                !n.log_text().contains(secret),
                "{} log leaks {secret}",
                n.name
            );
        }
    }
    assert!(config.contains("kinesis-data-stream"));

    // STOP/START keeps offsets: new records only, nothing twice.
    c.sql(m, "USE spec; STOP PIPELINE kinesis_pipeline")?;
    let more = rt.block_on(put_records(
        &kinesis,
        "kinesis-data-stream",
        &[("user-d".into(), br#"{"seq":6,"msg":"sixth"}"#.to_vec())],
    ))?;
    c.sql(m, "USE spec; START PIPELINE kinesis_pipeline")?;
    wait_for("6 rows", START, || {
        (count(&c, m, "spec", "kinesis_pipeline")? == 6).then_some(())
    })?;
    let all: Vec<_> = put.iter().chain(more.iter()).cloned().collect();
    assert_exactly_once(&c, m, "spec", "kinesis_pipeline", &all)?;

    // CREATE OR REPLACE keeps the offsets; DROP + CREATE starts again from TRIM_HORIZON.
    c.sql(m, "USE spec; STOP PIPELINE kinesis_pipeline")?;
    c.sql(
        m,
        &format!(
            "USE spec; {}",
            create_pipeline_sql("kinesis_pipeline", "kinesis-data-stream", 4)
                .replace("CREATE INFERRED", "CREATE OR REPLACE INFERRED")
        ),
    )?;
    c.sql(m, "USE spec; START PIPELINE kinesis_pipeline")?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&c, m, "spec", "kinesis_pipeline"), Some(6));
    c.sql(m, "USE spec; DROP PIPELINE kinesis_pipeline")?;
    assert!(offsets(&c, m, "kinesis_pipeline")?.is_empty());
    c.sql(
        m,
        &format!(
            "USE spec; {}",
            create_pipeline_sql("kinesis_pipeline", "kinesis-data-stream", 4)
        ),
    )?;
    c.sql(m, "USE spec; START PIPELINE kinesis_pipeline")?;
    wait_for("every record loaded a second time", START, || {
        (count(&c, m, "spec", "kinesis_pipeline")? == 12).then_some(())
    })?;
    Ok(())
}

#[test]
fn bad_pipeline_input_gets_clear_errors() -> Result<()> {
    let moto = Moto::start()?;
    let mut c = Cluster::start(ClusterSpec {
        aggregators: 1,
        leaves: 1,
        leaf_env: moto.leaf_env(),
        ..Default::default()
    })?;
    c.wait_for_master(START)?;
    c.wait_for_leaves_online(0, 1, START)?;
    setup(&c, 0, "bad")?;
    let class = "com.singlestore.kafka.connect.kinesis.KinesisSourceConnector";
    let cases: Vec<(String, &str)> = vec![
        ("CREATE INFERRED PIPELINE p AS LOAD DATA KAFKACONNECT 'k' CONFIG '{not json' CREDENTIALS '{}' FORMAT AVRO".into(), "not valid JSON"),
        ("CREATE INFERRED PIPELINE p AS LOAD DATA KAFKACONNECT 'k' CONFIG '{\"kinesis.stream\":\"s\"}' CREDENTIALS '{}' FORMAT AVRO".into(), "connector.class"),
        ("CREATE INFERRED PIPELINE p AS LOAD DATA KAFKACONNECT 'k' CONFIG '{\"connector.class\":\"com.example.Nope\"}' FORMAT AVRO".into(), "unknown connector.class"),
        (format!("CREATE INFERRED PIPELINE p AS LOAD DATA KAFKACONNECT 'k' CONFIG '{{\"connector.class\":\"{class}\"}}' FORMAT AVRO"), "kinesis.stream"),
        (format!("CREATE INFERRED PIPELINE p AS LOAD DATA KAFKACONNECT 'k' CONFIG '{{\"connector.class\":\"{class}\",\"kinesis.stream\":\"s\"}}' FORMAT CSV"), "FORMAT AVRO"),
        (format!("CREATE INFERRED PIPELINE p AS LOAD DATA KAFKACONNECT 'k' CONFIG '{{\"connector.class\":\"{class}\",\"kinesis.stream\":\"s\"}}'"), "FORMAT AVRO"),
        (format!("CREATE INFERRED PIPELINE p AS LOAD DATA KAFKACONNECT 'k' CONFIG '{{\"connector.class\":\"{class}\",\"kinesis.stream\":\"s\"}}' CREDENTIALS 'nope' FORMAT AVRO"), "CREDENTIALS"),
        (format!("CREATE INFERRED PIPELINE p AS LOAD DATA KAFKACONNECT 'k' CONFIG '{{\"connector.class\":\"{class}\",\"kinesis.stream\":\"s\",\"tasks.max\":0}}' FORMAT AVRO"), "tasks.max"),
        (format!("CREATE PIPELINE p AS LOAD DATA KAFKACONNECT 'k' CONFIG '{{\"connector.class\":\"{class}\",\"kinesis.stream\":\"s\"}}' INTO TABLE missing FORMAT AVRO"), "doesn't exist"),
    ];
    for (sql, words) in cases {
        let err = c
            .sql(0, &format!("USE bad; {sql}"))
            .expect_err(&sql)
            .to_string();
        assert!(err.contains(words), "{sql}\n=> {err}");
    }
    // A table that does not match the static schema.
    c.sql(0, "USE bad; CREATE TABLE wrong (a BIGINT NOT NULL)")?;
    let err = c
        .sql(0, &format!("USE bad; CREATE PIPELINE p AS LOAD DATA KAFKACONNECT 'k' CONFIG '{{\"connector.class\":\"{class}\",\"kinesis.stream\":\"s\"}}' INTO TABLE wrong FORMAT AVRO"))
        .expect_err("table mismatch")
        .to_string();
    assert!(err.contains("no column 'topic'"), "{err}");
    // A stream that does not exist: a clear error at START.
    c.sql(
        0,
        &format!(
            "USE bad; {}",
            create_pipeline_sql("ghost", "no-such-stream", 2)
        ),
    )?;
    let err = c
        .sql(0, "USE bad; START PIPELINE ghost")
        .expect_err("no stream")
        .to_string();
    assert!(
        err.contains("does not exist") && err.contains("no-such-stream"),
        "{err}"
    );
    assert!(!err.contains("sEcReT"), "{err}");
    assert_eq!(
        c.sql(0, "USE bad; SHOW PIPELINES")?.rows,
        vec![vec![
            "ghost".to_string(),
            "Stopped".to_string(),
            "False".to_string()
        ]]
    );
    assert!(c.aggregators[0].is_running() && c.leaves[0].is_running());
    Ok(())
}

#[test]
fn exactly_once_while_leaves_and_the_master_are_killed() -> Result<()> {
    // moto slows down as shards grow: a small stream.
    let records = std::env::var("SHARDLINE_CHAOS_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    chaos(Moto::start()?, records)
}

#[test]
fn exactly_once_for_50k_records_while_nodes_are_killed_on_the_simulator() -> Result<()> {
    chaos(Moto::sim(&["--no-limits"])?, 50_000)
}

/// Kills leaf 1, leaf 2 and the master (each brought back) while records flow into a
/// 4-shard stream, then checks every record landed exactly once.
fn chaos(moto: Moto, total: usize) -> Result<()> {
    let rt = runtime();
    let kinesis = moto.client();
    let mut c = Cluster::start(ClusterSpec {
        leaves: 3,
        leaf_env: moto.leaf_env(),
        aggregator_args: vec!["--leaf-heartbeat-timeout-ms".into(), "1500".into()],
        ..Default::default()
    })?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, 3, START)?;
    setup(&c, m, "chaos")?;
    rt.block_on(create_stream(&kinesis, "chaos-stream", 4))?;
    c.sql(
        m,
        &format!(
            "USE chaos; {}",
            create_pipeline_sql("chaos_pipeline", "chaos-stream", 4)
        ),
    )?;
    c.sql(m, "USE chaos; START PIPELINE chaos_pipeline")?;

    let producer = {
        let kinesis = kinesis.clone();
        rt.spawn(async move {
            let mut put_all = Vec::new();
            let mut n = 0usize;
            while n < total {
                let batch: Vec<(String, Vec<u8>)> = (n..(n + 500).min(total))
                    .map(|i| {
                        (
                            format!("key-{}", rand::random::<u32>()),
                            format!(r#"{{"seq":{i}}}"#).into_bytes(),
                        )
                    })
                    .collect();
                n += batch.len();
                put_all.extend(put_records(&kinesis, "chaos-stream", &batch).await?);
                tokio::time::sleep(Duration::from_millis(if total > 10_000 { 20 } else { 50 }))
                    .await;
            }
            anyhow::Ok(put_all)
        })
    };
    let started = Instant::now();
    let mut faults = Vec::new();
    // Leaf 0 killed and brought back; then leaf 1; then the master.
    for (at, what) in [(2u64, "leaf-1"), (6, "leaf-2"), (10, "master")] {
        while started.elapsed() < Duration::from_secs(at) {
            std::thread::sleep(Duration::from_millis(50));
        }
        match what {
            "master" => {
                let master = c.wait_for_master(START)?;
                c.aggregators[master].kill();
                faults.push(format!(
                    "SIGKILL master aggregator-{} at {:?}",
                    master + 1,
                    started.elapsed()
                ));
                std::thread::sleep(Duration::from_secs(2));
                c.aggregators[master].start()?;
            }
            leaf => {
                let i: usize = leaf[5..].parse::<usize>()? - 1;
                c.leaves[i].kill();
                faults.push(format!("SIGKILL {leaf} at {:?}", started.elapsed()));
                std::thread::sleep(Duration::from_secs(2));
                c.leaves[i].start()?;
            }
        }
    }
    let put = rt.block_on(producer)??;
    println!("faults: {faults:?}");
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, 3, START)?;
    let t0 = Instant::now();
    wait_for(&format!("{total} rows"), Duration::from_secs(120), || {
        (count(&c, m, "chaos", "chaos_pipeline")? >= total).then_some(())
    })?;
    // Let any in-flight batch settle, then check.
    std::thread::sleep(Duration::from_secs(2));
    println!(
        "all rows visible {:?} after the last put; total {:?}",
        t0.elapsed(),
        started.elapsed()
    );
    assert_exactly_once(&c, m, "chaos", "chaos_pipeline", &put)?;
    let state = c
        .sql(
            m,
            "SELECT STATE FROM information_schema.PIPELINES WHERE PIPELINE_NAME = 'chaos_pipeline'",
        )?
        .rows;
    assert_eq!(state, vec![vec!["Running".to_string()]]);
    Ok(())
}

#[test]
fn resharding_mid_stream_loses_and_doubles_nothing() -> Result<()> {
    // moto routes writes to a closed parent shard (real Kinesis never does), so resharding
    // runs against our simulator, with AWS's limits on.
    let moto = Moto::sim(&[])?;
    let rt = runtime();
    let kinesis = moto.client();
    let (c, m) = pipeline_cluster(
        &moto,
        ClusterSpec {
            ..Default::default()
        },
        "reshard",
    )?;
    rt.block_on(create_stream(&kinesis, "reshard-stream", 2))?;
    let batch = |from: usize, n: usize| -> Vec<(String, Vec<u8>)> {
        (from..from + n)
            .map(|i| {
                (
                    format!("key-{}", rand::random::<u32>()),
                    format!(r#"{{"seq":{i}}}"#).into_bytes(),
                )
            })
            .collect()
    };
    let mut put = rt.block_on(put_records(&kinesis, "reshard-stream", &batch(0, 300)))?;
    c.sql(
        m,
        &format!(
            "USE reshard; {}",
            create_pipeline_sql("reshard_pipeline", "reshard-stream", 4)
        ),
    )?;
    c.sql(m, "USE reshard; START PIPELINE reshard_pipeline")?;
    put.extend(rt.block_on(put_records(&kinesis, "reshard-stream", &batch(300, 200)))?);
    // Split shard 0 at the middle of its hash range, keep writing, then merge its children.
    rt.block_on(async {
        kinesis
            .split_shard()
            .stream_name("reshard-stream")
            .shard_to_split("shardId-000000000000")
            .new_starting_hash_key("85070591730234615865843651857942052864")
            .send()
            .await
    })?;
    put.extend(rt.block_on(put_records(&kinesis, "reshard-stream", &batch(500, 300)))?);
    rt.block_on(async {
        kinesis
            .merge_shards()
            .stream_name("reshard-stream")
            .shard_to_merge("shardId-000000000002")
            .adjacent_shard_to_merge("shardId-000000000003")
            .send()
            .await
    })?;
    put.extend(rt.block_on(put_records(&kinesis, "reshard-stream", &batch(800, 300)))?);
    let shards: HashSet<&str> = put.iter().map(|(s, _)| s.as_str()).collect();
    println!(
        "records per shard: {:?}",
        shards
            .iter()
            .map(|s| (s, put.iter().filter(|p| p.0 == *s).count()))
            .collect::<Vec<_>>()
    );
    assert!(
        shards.len() >= 4,
        "records landed on parents and children: {shards:?}"
    );
    wait_for(
        &format!("{} rows", put.len()),
        Duration::from_secs(90),
        || (count(&c, m, "reshard", "reshard_pipeline")? >= put.len()).then_some(()),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let closed = rt.block_on(closed_shards(&kinesis, "reshard-stream"))?;
    assert_exactly_once_resharded(&c, m, "reshard", "reshard_pipeline", &put, &closed)?;
    Ok(())
}

#[test]
fn a_frozen_leaf_that_wakes_up_doubles_nothing() -> Result<()> {
    let moto = Moto::start()?;
    let rt = runtime();
    let kinesis = moto.client();
    let (c, m) = pipeline_cluster(
        &moto,
        ClusterSpec {
            aggregator_args: vec!["--leaf-heartbeat-timeout-ms".into(), "1000".into()],
            ..Default::default()
        },
        "fence",
    )?;
    rt.block_on(create_stream(&kinesis, "fence-stream", 2))?;
    c.sql(
        m,
        &format!(
            "USE fence; {}",
            create_pipeline_sql("fence_pipeline", "fence-stream", 2)
        ),
    )?;
    c.sql(m, "USE fence; START PIPELINE fence_pipeline")?;
    let mut put = Vec::new();
    for round in 0..6 {
        let recs: Vec<(String, Vec<u8>)> = (0..100)
            .map(|i| {
                (
                    format!("k-{}", rand::random::<u32>()),
                    format!(r#"{{"r":{round},"i":{i}}}"#).into_bytes(),
                )
            })
            .collect();
        put.extend(rt.block_on(put_records(&kinesis, "fence-stream", &recs))?);
        if round == 1 {
            // Freeze leaf 1 past the heartbeat timeout: its tasks move; then it wakes up.
            let pid = c.leaves[0].pid().expect("running");
            crate::harness::signal(pid, "STOP")?;
            wait_for(
                "the frozen leaf to be declared offline",
                Duration::from_secs(10),
                || {
                    let states = c.leaf_states(m).ok()?;
                    (states.iter().filter(|(_, s)| s == "offline").count() == 1).then_some(())
                },
            )?;
            std::thread::sleep(Duration::from_secs(2));
            crate::harness::signal(pid, "CONT")?;
        }
    }
    c.wait_for_leaves_online(m, 2, START)?;
    wait_for(
        &format!("{} rows", put.len()),
        Duration::from_secs(60),
        || (count(&c, m, "fence", "fence_pipeline")? >= put.len()).then_some(()),
    )?;
    std::thread::sleep(Duration::from_secs(3));
    assert_exactly_once(&c, m, "fence", "fence_pipeline", &put)?;
    Ok(())
}

#[test]
fn big_and_binary_records_load_and_an_unreachable_kinesis_ends_in_error() -> Result<()> {
    let moto = Moto::start()?;
    let rt = runtime();
    let kinesis = moto.client();
    let mut c = Cluster::start(ClusterSpec {
        aggregators: 1,
        leaves: 1,
        leaf_env: moto.leaf_env(),
        ..Default::default()
    })?;
    c.wait_for_master(START)?;
    c.wait_for_leaves_online(0, 1, START)?;
    setup(&c, 0, "edge")?;
    rt.block_on(create_stream(&kinesis, "edge-stream", 1))?;
    // A record of 1 MiB (data + key, the Kinesis maximum) and one that is not UTF-8.
    let big = vec![b'x'; 1024 * 1024 - 3];
    let binary: Vec<u8> = (0..=255u8).rev().collect();
    let put = rt.block_on(put_records(
        &kinesis,
        "edge-stream",
        &[("big".into(), big.clone()), ("bin".into(), binary.clone())],
    ))?;
    c.sql(
        0,
        &format!(
            "USE edge; {}",
            create_pipeline_sql("edge_pipeline", "edge-stream", 1)
        ),
    )?;
    // TEST PIPELINE extracts without loading.
    let tested = c
        .sql(0, "USE edge; TEST PIPELINE edge_pipeline LIMIT 1")?
        .rows;
    assert_eq!(tested.len(), 1);
    assert_eq!(tested[0][0], "kinesis-topic");
    assert_eq!(count(&c, 0, "edge", "edge_pipeline"), Some(0));
    c.sql(
        0,
        "USE edge; ALTER PIPELINE edge_pipeline SET MAX_RETRIES_PER_BATCH_PARTITION 1",
    )?;
    c.sql(0, "USE edge; START PIPELINE edge_pipeline")?;
    wait_for("2 rows", START, || {
        (count(&c, 0, "edge", "edge_pipeline")? == 2).then_some(())
    })?;
    assert_exactly_once(&c, 0, "edge", "edge_pipeline", &put)?;
    let sizes = c
        .sql(0, "USE edge; SELECT JSON_EXTRACT_STRING(id, 'partitionKey') AS k, LENGTH(FROM_BASE64(JSON_EXTRACT_STRING(record, 'data'))) AS n, TO_BASE64(FROM_BASE64(JSON_EXTRACT_STRING(record, 'data'))) = JSON_EXTRACT_STRING(record, 'data') AS same FROM edge_pipeline ORDER BY k")?
        .rows;
    assert_eq!(sizes[0][0], "big");
    assert_eq!(sizes[0][1], big.len().to_string());
    assert_eq!(sizes[1][0], "bin");
    assert_eq!(sizes[1][1], "256");
    // Kinesis goes away: retries, then Error with the reason in PIPELINES_ERRORS.
    drop(moto);
    wait_for("the pipeline in Error", Duration::from_secs(60), || {
        let rows = c.sql(0, "SELECT STATE FROM information_schema.PIPELINES WHERE PIPELINE_NAME = 'edge_pipeline'").ok()?.rows;
        (rows == vec![vec!["Error".to_string()]]).then_some(())
    })?;
    let errors = c.sql(0, "SELECT ERROR_TYPE, ERROR_MESSAGE FROM information_schema.PIPELINES_ERRORS WHERE PIPELINE_NAME = 'edge_pipeline'")?.rows;
    assert!(!errors.is_empty());
    assert!(
        errors.iter().all(|e| e[1].starts_with("LEAF ERROR (")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e[1].contains("edge-stream")),
        "{errors:?}"
    );
    assert!(c.aggregators[0].is_running() && c.leaves[0].is_running());
    c.sql(0, "USE edge; CLEAR PIPELINE ERRORS")?;
    assert!(c
        .sql(0, "SELECT * FROM information_schema.PIPELINES_ERRORS")?
        .rows
        .is_empty());
    Ok(())
}

#[test]
fn datagen_in_the_foreground_loads_every_record_once() -> Result<()> {
    let mut c = Cluster::start(ClusterSpec::default())?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, 2, START)?;
    setup(&c, m, "gen")?;
    let per_task = 5000;
    c.sql(
        m,
        &format!(
            "USE gen; CREATE INFERRED PIPELINE dg AS LOAD DATA KAFKACONNECT 'datagen' CONFIG '{{\"connector.class\":\"io.shardline.connect.datagen.DatagenSourceConnector\",\"datagen.rate\":0,\"datagen.records\":{per_task},\"tasks.max\":2}}' FORMAT AVRO"
        ),
    )?;
    c.sql(m, "SET GLOBAL pipelines_extractor_batch_size = 2000")?;
    let started = Instant::now();
    c.sql(m, "USE gen; START PIPELINE dg FOREGROUND")?;
    let elapsed = started.elapsed();
    let rows = count(&c, m, "gen", "dg").unwrap_or(0);
    println!("datagen: {rows} rows in {elapsed:?} (foreground, incl. idle detection)");
    assert_eq!(rows, 2 * per_task);
    let distinct =
        c.sql(m, "SELECT COUNT(DISTINCT record) FROM gen.dg")?.rows[0][0].parse::<usize>()?;
    assert_eq!(distinct, 2 * per_task);
    let state = c
        .sql(
            m,
            "SELECT STATE FROM information_schema.PIPELINES WHERE PIPELINE_NAME = 'dg'",
        )?
        .rows;
    assert_eq!(
        state,
        vec![vec!["Stopped".to_string()]],
        "FOREGROUND stops the pipeline when done"
    );
    let offsets = c.sql(m, "SELECT `KEY`, `VALUE` FROM information_schema.PIPELINES_SOURCE_OFFSETS WHERE PIPELINE_NAME = 'dg' ORDER BY `KEY`")?.rows;
    let last = (per_task - 1).to_string();
    assert_eq!(
        offsets,
        vec![
            vec![r#"{"task":0}"#.to_string(), format!(r#"{{"seq":{last}}}"#)],
            vec![r#"{"task":1}"#.to_string(), format!(r#"{{"seq":{last}}}"#)],
        ]
    );
    Ok(())
}

#[test]
fn throttling_and_expiring_iterators_lose_nothing_and_stay_running() -> Result<()> {
    let sim = Moto::sim(&["--throttle-rate", "0.3", "--iterator-ttl-ms", "1500"])?;
    let rt = runtime();
    let kinesis = sim.client();
    let mut c = Cluster::start(ClusterSpec {
        aggregators: 1,
        leaves: 2,
        leaf_env: sim.leaf_env(),
        ..Default::default()
    })?;
    c.wait_for_master(START)?;
    c.wait_for_leaves_online(0, 2, START)?;
    setup(&c, 0, "throttle")?;
    rt.block_on(create_stream(&kinesis, "throttled", 3))?;
    c.sql(
        0,
        &format!(
            "USE throttle; {}",
            create_pipeline_sql("throttled_pipeline", "throttled", 3)
        ),
    )?;
    c.sql(0, "USE throttle; START PIPELINE throttled_pipeline")?;
    let mut put = Vec::new();
    for round in 0..5 {
        let recs: Vec<(String, Vec<u8>)> = (0..200)
            .map(|i| {
                (
                    format!("k-{}", rand::random::<u32>()),
                    format!(r#"{{"r":{round},"i":{i}}}"#).into_bytes(),
                )
            })
            .collect();
        put.extend(rt.block_on(put_records(&kinesis, "throttled", &recs))?);
        // Idle gaps longer than the iterator lifetime.
        std::thread::sleep(Duration::from_millis(1800));
    }
    wait_for(
        &format!("{} rows", put.len()),
        Duration::from_secs(60),
        || (count(&c, 0, "throttle", "throttled_pipeline")? >= put.len()).then_some(()),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    assert_exactly_once(&c, 0, "throttle", "throttled_pipeline", &put)?;
    let state = c.sql(0, "SELECT STATE FROM information_schema.PIPELINES WHERE PIPELINE_NAME = 'throttled_pipeline'")?.rows;
    assert_eq!(state, vec![vec!["Running".to_string()]]);
    Ok(())
}

#[test]
fn the_spec_computed_columns_work_for_old_and_new_rows_while_running() -> Result<()> {
    let sim = Moto::sim(&[])?;
    let rt = runtime();
    let kinesis = sim.client();
    let (c, m) = pipeline_cluster(
        &sim,
        ClusterSpec {
            ..Default::default()
        },
        "cc",
    )?;
    rt.block_on(create_stream(&kinesis, "kinesis-data-stream", 1))?;
    let spec: Vec<(String, Vec<u8>)> = [
        (1, "first", "user-a"),
        (2, "second", "user-b"),
        (3, "third", "user-a"),
        (4, "fourth", "user-c"),
        (5, "fifth", "user-b"),
    ]
    .iter()
    .map(|(seq, msg, key)| {
        (
            key.to_string(),
            format!(r#"{{"seq":{seq},"msg":"{msg}"}}"#).into_bytes(),
        )
    })
    .collect();
    let mut put = rt.block_on(put_records(&kinesis, "kinesis-data-stream", &spec[..3]))?;
    c.sql(
        m,
        &format!(
            "USE cc; {}",
            create_pipeline_sql("kinesis_pipeline", "kinesis-data-stream", 4)
        ),
    )?;
    c.sql(m, "USE cc; START PIPELINE kinesis_pipeline")?;
    wait_for("3 rows", START, || {
        (count(&c, m, "cc", "kinesis_pipeline")? == 3).then_some(())
    })?;
    // The spec's three ALTERs, verbatim, while the pipeline runs.
    c.sql(
        m,
        "USE cc;
ALTER TABLE kinesis_pipeline ADD COLUMN partition_key
  AS JSON_EXTRACT_STRING(record, 'partitionKey') PERSISTED VARCHAR(128);

ALTER TABLE kinesis_pipeline ADD COLUMN seq
  AS JSON_EXTRACT_BIGINT(
    FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')),
    'seq'
  ) PERSISTED BIGINT;

ALTER TABLE kinesis_pipeline ADD COLUMN msg
  AS JSON_EXTRACT_STRING(
    FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')),
    'msg'
  ) PERSISTED VARCHAR(512);",
    )?;
    put.extend(rt.block_on(put_records(&kinesis, "kinesis-data-stream", &spec[3..]))?);
    wait_for("5 rows", START, || {
        (count(&c, m, "cc", "kinesis_pipeline")? == 5).then_some(())
    })?;
    // Another aggregator answers once it has applied the ALTERs (followers lag by a heartbeat).
    let rows = wait_for("the computed columns on a follower", START, || {
        c.sql(
            (m + 1) % 3,
            "USE cc; SELECT topic, partition_key, seq, msg, record
FROM kinesis_pipeline
WHERE seq > 3
ORDER BY seq;",
        )
        .ok()
    })?
    .rows;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0][..4], ["kinesis-topic", "user-c", "4", "fourth"]);
    assert_eq!(rows[1][..4], ["kinesis-topic", "user-b", "5", "fifth"]);
    assert!(rows[0][4].contains(r#""data":"eyJzZXEiOjQsIm1zZyI6ImZvdXJ0aCJ9""#));
    // Computed columns agree with the JSON expression on every row, old and new.
    let all = c
        .sql(m, "USE cc; SELECT seq, JSON_EXTRACT_BIGINT(FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')), 'seq'), partition_key, JSON_EXTRACT_STRING(record, 'partitionKey') FROM kinesis_pipeline ORDER BY seq")?
        .rows;
    assert_eq!(all.len(), 5);
    for r in &all {
        assert_eq!(r[0], r[1]);
        assert_eq!(r[2], r[3]);
    }
    let ddl = c
        .sql(m, "USE cc; SHOW CREATE TABLE kinesis_pipeline")?
        .rows
        .concat()
        .join("\n");
    assert!(ddl.contains("`seq` AS JSON_EXTRACT_BIGINT("), "{ddl}");
    let err = c.sql(m, "USE cc; ALTER TABLE kinesis_pipeline ADD COLUMN seq AS JSON_EXTRACT_STRING(record, 'x') PERSISTED BIGINT").expect_err("duplicate");
    assert!(err.to_string().contains("Duplicate column"), "{err}");
    let err = c
        .sql(
            m,
            "USE cc; ALTER TABLE kinesis_pipeline ADD COLUMN z AS NOW() PERSISTED BIGINT",
        )
        .expect_err("bad expr");
    assert!(err.to_string().contains("not supported"), "{err}");
    assert_exactly_once(&c, m, "cc", "kinesis_pipeline", &put)?;
    Ok(())
}

pub(crate) fn datagen_config(per_task: usize) -> String {
    format!(
        "{{\"connector.class\":\"io.shardline.connect.datagen.DatagenSourceConnector\",\"datagen.rate\":0,\"datagen.records\":{per_task},\"tasks.max\":2}}"
    )
}

#[test]
fn an_index_on_a_computed_column_answers_like_the_json_expression_on_100k_rows() -> Result<()> {
    let mut c = Cluster::start(ClusterSpec::default())?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, 2, START)?;
    setup(&c, m, "idx")?;
    c.sql(m, "SET GLOBAL pipelines_extractor_batch_size = 10000")?;
    c.sql(m, &format!("USE idx; CREATE INFERRED PIPELINE gen AS LOAD DATA KAFKACONNECT 'datagen' CONFIG '{}' FORMAT AVRO", datagen_config(50_000)))?;
    c.sql(m, "USE idx; START PIPELINE gen FOREGROUND")?;
    assert_eq!(count(&c, m, "idx", "gen"), Some(100_000));
    c.sql(m, "USE idx; ALTER TABLE gen ADD COLUMN seq AS JSON_EXTRACT_BIGINT(record, 'seq') PERSISTED BIGINT")?;
    c.sql(m, "USE idx; ALTER TABLE gen ADD COLUMN task AS JSON_EXTRACT_STRING(record, 'task') PERSISTED VARCHAR(8)")?;
    let queries = [
        ("seq > 49990", "JSON_EXTRACT_BIGINT(record, 'seq') > 49990"),
        ("seq = 12345", "JSON_EXTRACT_BIGINT(record, 'seq') = 12345"),
        ("seq >= 100 AND seq < 200", "JSON_EXTRACT_BIGINT(record, 'seq') >= 100 AND JSON_EXTRACT_BIGINT(record, 'seq') < 200"),
        ("task = '1' AND seq <= 3", "JSON_EXTRACT_STRING(record, 'task') = '1' AND JSON_EXTRACT_BIGINT(record, 'seq') <= 3"),
    ];
    let answer = |w: &str| -> Result<Vec<Vec<String>>> {
        Ok(c.sql(
            m,
            &format!("USE idx; SELECT COUNT(*), SUM(seq), MIN(task), MAX(task) FROM gen WHERE {w}"),
        )?
        .rows)
    };
    let mut plain = Vec::new();
    for (computed, json) in &queries {
        let t = Instant::now();
        let a = answer(computed)?;
        let without_index = t.elapsed();
        let t = Instant::now();
        let b = answer(json)?;
        let json_time = t.elapsed();
        assert_eq!(a, b, "{computed} vs {json}");
        plain.push((a, without_index, json_time));
    }
    c.sql(m, "USE idx; CREATE INDEX idx_seq ON gen (seq)")?;
    c.sql(m, "USE idx; CREATE INDEX idx_task ON gen (task)")?;
    for ((computed, json), (expected, without_index, json_time)) in queries.iter().zip(&plain) {
        let t = Instant::now();
        let got = answer(computed)?;
        println!("WHERE {computed}: json expr {json_time:?}, computed column {without_index:?}, with index {:?} ({json})", t.elapsed());
        assert_eq!(&got, expected, "{computed} with the index");
    }
    assert_eq!(answer("seq = 12345")?[0][0], "2");
    // Rows loaded after the index exist are indexed too.
    c.sql(
        m,
        &format!(
            "USE idx; ALTER PIPELINE gen SET CONFIG '{}'",
            datagen_config(50_100)
        ),
    )?;
    c.sql(m, "USE idx; START PIPELINE gen FOREGROUND")?;
    assert_eq!(count(&c, m, "idx", "gen"), Some(100_200));
    assert_eq!(
        answer("seq > 50050")?,
        answer("JSON_EXTRACT_BIGINT(record, 'seq') > 50050")?
    );
    assert_eq!(answer("seq > 50050")?[0][0], "98");
    let ddl = c
        .sql(m, "USE idx; SHOW CREATE TABLE gen")?
        .rows
        .concat()
        .join("\n");
    assert!(ddl.contains("KEY `idx_seq` (`seq`)"), "{ddl}");
    c.sql(m, "USE idx; DROP INDEX idx_seq ON gen")?;
    assert_eq!(answer("seq = 12345")?[0][0], "2");
    Ok(())
}

#[test]
fn a_query_that_would_miss_a_down_leaf_fails_and_names_it() -> Result<()> {
    let mut c = Cluster::start(ClusterSpec {
        aggregators: 1,
        ..Default::default()
    })?;
    c.wait_for_master(START)?;
    c.wait_for_leaves_online(0, 2, START)?;
    setup(&c, 0, "down")?;
    c.sql(0, &format!("USE down; CREATE INFERRED PIPELINE gen AS LOAD DATA KAFKACONNECT 'datagen' CONFIG '{}' FORMAT AVRO", datagen_config(100)))?;
    c.sql(0, "USE down; START PIPELINE gen FOREGROUND")?;
    assert_eq!(count(&c, 0, "down", "gen"), Some(200));
    c.leaves[1].kill();
    wait_for("the leaf offline", Duration::from_secs(10), || {
        (c.leaf_states(0)
            .ok()?
            .iter()
            .filter(|(_, s)| s == "offline")
            .count()
            == 1)
            .then_some(())
    })?;
    let err = c
        .sql(0, "SELECT COUNT(*) FROM down.gen")
        .expect_err("incomplete answer")
        .to_string();
    assert!(
        err.contains("offline") && err.contains("partitions") && err.contains("incomplete"),
        "{err}"
    );
    // Errors for unknown tables and columns are MySQL's.
    let err = c
        .sql(0, "SELECT * FROM down.nope")
        .expect_err("no table")
        .to_string();
    assert!(err.contains("ERROR 1146"), "{err}");
    c.leaves[1].start()?;
    c.wait_for_leaves_online(0, 2, START)?;
    assert_eq!(count(&c, 0, "down", "gen"), Some(200));
    let err = c
        .sql(0, "SELECT nope FROM down.gen")
        .expect_err("no column")
        .to_string();
    assert!(err.contains("ERROR 1054"), "{err}");
    Ok(())
}

#[test]
fn alter_pipeline_moves_offsets_and_settings() -> Result<()> {
    let mut c = Cluster::start(ClusterSpec {
        aggregators: 1,
        ..Default::default()
    })?;
    c.wait_for_master(START)?;
    c.wait_for_leaves_online(0, 2, START)?;
    setup(&c, 0, "alt")?;
    let config = "{\"connector.class\":\"io.shardline.connect.datagen.DatagenSourceConnector\",\"datagen.rate\":0,\"datagen.records\":100,\"tasks.max\":1}";
    c.sql(0, &format!("USE alt; CREATE INFERRED PIPELINE g AS LOAD DATA KAFKACONNECT 'datagen' CONFIG '{config}' BATCH_INTERVAL 100 FORMAT AVRO"))?;
    c.sql(0, "USE alt; START PIPELINE g FOREGROUND")?;
    assert_eq!(count(&c, 0, "alt", "g"), Some(100));
    // Settings that change what is read need a stopped pipeline.
    c.sql(0, "USE alt; START PIPELINE g")?;
    let err = c
        .sql(0, "USE alt; ALTER PIPELINE g SET OFFSETS EARLIEST")
        .expect_err("running")
        .to_string();
    assert!(err.contains("already running"), "{err}");
    c.sql(0, "USE alt; ALTER PIPELINE g SET BATCH_INTERVAL 200")?;
    c.sql(0, "USE alt; STOP PIPELINE g")?;
    // Back to seq 89: 90..99 load again.
    c.sql(
        0,
        r#"USE alt; ALTER PIPELINE g SET OFFSETS '[{"KEY": {"task": 0}, "VALUE": {"seq": 89}}]'"#,
    )?;
    let offsets = c.sql(0, "SELECT `KEY`, `VALUE` FROM information_schema.PIPELINES_SOURCE_OFFSETS WHERE PIPELINE_NAME = 'g'")?.rows;
    assert_eq!(
        offsets,
        vec![vec![
            r#"{"task":0}"#.to_string(),
            r#"{"seq":89}"#.to_string()
        ]]
    );
    c.sql(0, "USE alt; START PIPELINE g FOREGROUND")?;
    assert_eq!(count(&c, 0, "alt", "g"), Some(110));
    c.sql(0, "USE alt; ALTER PIPELINE g SET OFFSETS EARLIEST")?;
    c.sql(0, "USE alt; START PIPELINE g FOREGROUND")?;
    assert_eq!(count(&c, 0, "alt", "g"), Some(210));
    let create = c
        .sql(0, "USE alt; SHOW CREATE PIPELINE g")?
        .rows
        .concat()
        .join(" ");
    assert!(create.contains("BATCH_INTERVAL 200"), "{create}");
    let err = c
        .sql(0, "USE alt; ALTER PIPELINE g SET CONFIG 'nope'")
        .expect_err("bad json")
        .to_string();
    assert!(err.contains("not valid JSON"), "{err}");
    Ok(())
}

#[test]
fn every_node_serves_prometheus_metrics() -> Result<()> {
    use crate::harness::{metric_sum, scrape};
    let mut c = Cluster::start(ClusterSpec {
        metrics: true,
        ..Default::default()
    })?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, 2, START)?;
    setup(&c, m, "met")?;
    c.sql(m, &format!("USE met; CREATE INFERRED PIPELINE gen AS LOAD DATA KAFKACONNECT 'datagen' CONFIG '{}' FORMAT AVRO", datagen_config(500)))?;
    c.sql(m, "USE met; START PIPELINE gen FOREGROUND")?;
    let aggs: Vec<String> = (0..3)
        .map(|i| scrape(c.metrics_ports[i]))
        .collect::<Result<_>>()?;
    let leaves: Vec<String> = (3..5)
        .map(|i| scrape(c.metrics_ports[i]))
        .collect::<Result<_>>()?;
    assert_eq!(
        aggs.iter()
            .map(|t| metric_sum(t, "shardline_raft_is_leader"))
            .sum::<f64>(),
        1.0
    );
    assert_eq!(metric_sum(&aggs[m], "shardline_raft_is_leader"), 1.0);
    assert!(
        metric_sum(&aggs[m], "shardline_batches_committed_total") >= 1.0,
        "{}",
        aggs[m]
    );
    assert!(
        metric_sum(&aggs[m], "shardline_task_assignments_total") >= 2.0,
        "{}",
        aggs[m]
    );
    assert_eq!(
        leaves
            .iter()
            .map(|t| metric_sum(t, "shardline_rows_loaded_total"))
            .sum::<f64>(),
        1000.0
    );
    assert!(leaves
        .iter()
        .all(|t| t.contains("# TYPE shardline_rows_loaded_total counter")));
    Ok(())
}

/// A leaf that joins after the database was created (what scaling the leaf StatefulSet does)
/// holds none of its partitions; REBALANCE PARTITIONS gives it some, tasks move to it while
/// records flow, and every record still lands exactly once.
#[test]
fn a_joining_leaf_takes_tasks_after_rebalance_partitions() -> Result<()> {
    let sim = Moto::sim(&["--no-limits"])?;
    let rt = runtime();
    let kinesis = sim.client();
    let (mut c, m) = pipeline_cluster(
        &sim,
        ClusterSpec {
            leaves: 3,
            ..Default::default()
        },
        "scale_tmp",
    )?;
    // Leaf 3 is away while the database is made: it holds none of its partitions.
    c.leaves[2].kill();
    wait_for("leaf-3 offline", Duration::from_secs(10), || {
        let s = c.leaf_states(m).ok()?;
        (s.iter().filter(|(_, st)| st == "online").count() == 2).then_some(())
    })?;
    c.sql(m, "CREATE DATABASE scale")?;
    rt.block_on(create_stream(&kinesis, "scale-stream", 4))?;
    c.sql(
        m,
        &format!(
            "USE scale; {}",
            create_pipeline_sql("scale_pipeline", "scale-stream", 4)
        ),
    )?;
    c.sql(m, "USE scale; START PIPELINE scale_pipeline")?;
    let batch = |from: usize| -> Vec<(String, Vec<u8>)> {
        (from..from + 500)
            .map(|i| {
                (
                    format!("key-{}", rand::random::<u32>()),
                    format!(r#"{{"seq":{i}}}"#).into_bytes(),
                )
            })
            .collect()
    };
    let mut put = rt.block_on(put_records(&kinesis, "scale-stream", &batch(0)))?;
    c.leaves[2].start()?;
    c.wait_for_leaves_online(m, 3, START)?;
    put.extend(rt.block_on(put_records(&kinesis, "scale-stream", &batch(500)))?);
    let partitions_on =
        |c: &Cluster| -> Result<usize> { Ok(c.sql(m, "SHOW PARTITIONS ON scale")?.rows.len()) };
    let before = partitions_on(&c)?;
    assert!(
        !c.leaves[2].log_text().contains("starting task"),
        "a leaf without partitions ran a task"
    );
    c.sql(m, "REBALANCE PARTITIONS ON scale")?;
    let after = partitions_on(&c)?;
    println!("rebalance: {before} -> {after} partitions");
    assert!(after > before, "the new leaf got partitions");
    c.sql(m, "USE scale; REBALANCE PARTITIONS")?;
    assert_eq!(partitions_on(&c)?, after, "a second rebalance is a no-op");
    for i in 1..6 {
        put.extend(rt.block_on(put_records(&kinesis, "scale-stream", &batch(500 * (i + 1))))?);
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_for("leaf-3 to run a task", Duration::from_secs(20), || {
        c.leaves[2]
            .log_text()
            .contains("starting task")
            .then_some(())
    })?;
    wait_for(
        &format!("{} rows", put.len()),
        Duration::from_secs(60),
        || (count(&c, m, "scale", "scale_pipeline")? >= put.len()).then_some(()),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    assert_exactly_once(&c, m, "scale", "scale_pipeline", &put)?;
    let err = c
        .sql(m, "REBALANCE PARTITIONS ON nowhere")
        .expect_err("unknown database");
    assert!(err.to_string().contains("1049"), "{err}");
    Ok(())
}

/// START PIPELINE ... FOREGROUND while a leaf running one of the tasks dies: the statement waits
/// for the task to move (the heartbeat timeout, 8 s here: the other task ends long before the
/// killed one's moves, longer than a plain idle window) instead of
/// calling the pipeline idle, and returns once every source partition ended, with every record
/// loaded once.
#[test]
fn foreground_outlasts_a_killed_leaf_and_ends_with_its_source() -> Result<()> {
    let mut c = Cluster::start(ClusterSpec {
        aggregators: 1,
        aggregator_args: vec!["--leaf-heartbeat-timeout-ms".into(), "8000".into()],
        ..Default::default()
    })?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, 2, START)?;
    setup(&c, m, "fg")?;
    let per_task = 8000;
    c.sql(
        m,
        &format!(
            "USE fg; CREATE INFERRED PIPELINE dg AS LOAD DATA KAFKACONNECT 'datagen' CONFIG '{{\"connector.class\":\"io.shardline.connect.datagen.DatagenSourceConnector\",\"datagen.rate\":2000,\"datagen.records\":{per_task},\"tasks.max\":2}}' FORMAT AVRO"
        ),
    )?;
    let port = c.mysql_ports[m];
    let foreground = std::thread::spawn(move || {
        let t = Instant::now();
        let out = crate::harness::mysql(port, "", "USE fg; START PIPELINE dg FOREGROUND");
        (out.map(|_| ()), t.elapsed())
    });
    // Kill leaf 1 mid-run (both leaves run one task each); it stays dead.
    wait_for("rows arriving", Duration::from_secs(20), || {
        (count(&c, m, "fg", "dg")? >= 2000).then_some(())
    })?;
    c.leaves[0].kill();
    let (result, took) = foreground.join().expect("foreground thread");
    result?;
    // The dead leaf's rows are readable again once it is back (queries never skip a leaf).
    c.leaves[0].start()?;
    c.wait_for_leaves_online(m, 2, START)?;
    let rows = count(&c, m, "fg", "dg").unwrap_or(0);
    println!("foreground with a killed leaf: {rows} rows, returned after {took:?}");
    assert_eq!(
        rows,
        2 * per_task,
        "FOREGROUND returned before the moved task finished"
    );
    let distinct =
        c.sql(m, "SELECT COUNT(DISTINCT record) FROM fg.dg")?.rows[0][0].parse::<usize>()?;
    assert_eq!(distinct, 2 * per_task);
    Ok(())
}
