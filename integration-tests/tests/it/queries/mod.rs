//! Queries over tables on the leaves: the leaves filter, project, aggregate and limit what they
//! hold, results stream to the client, and the leaves' counters show what stayed on them.

use crate::harness::{metric_sum, mysql_command, scrape, wait_for, Cluster, ClusterSpec};
use crate::pipelines::{count, datagen_config, setup, START};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

mod plans;

/// Rows the leaves read from storage and sent back, summed over the leaves.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LeafWork {
    scanned: f64,
    sent: f64,
}

fn leaf_work(c: &Cluster) -> Result<LeafWork> {
    let mut w = LeafWork {
        scanned: 0.0,
        sent: 0.0,
    };
    for port in c.leaf_metrics_ports() {
        let text = scrape(*port)?;
        w.scanned += metric_sum(&text, "shardline_leaf_scan_rows_total");
        w.sent += metric_sum(&text, "shardline_leaf_query_rows_sent_total");
    }
    Ok(w)
}

/// The leaves' counters once they stop moving (a scan stopped early by a LIMIT counts the rows
/// it read ahead when its reader goes away, a moment after the result is complete).
fn settled_work(c: &Cluster) -> Result<LeafWork> {
    let mut last = leaf_work(c)?;
    wait_for("the leaves' query counters to settle", START, || {
        std::thread::sleep(Duration::from_millis(300));
        let now = leaf_work(c).ok()?;
        let settled = now == last;
        last = now;
        settled.then_some(now)
    })
}

/// Runs `sql`; returns its rows and the rows the leaves read and sent for it.
fn measured(c: &Cluster, m: usize, sql: &str) -> Result<(Vec<Vec<String>>, LeafWork)> {
    let before = settled_work(c)?;
    let rows = c.sql(m, sql)?.rows;
    let after = settled_work(c)?;
    Ok((
        rows,
        LeafWork {
            scanned: after.scanned - before.scanned,
            sent: after.sent - before.sent,
        },
    ))
}

fn cluster(leaf_env: Vec<(String, String)>) -> Result<(Cluster, usize)> {
    let mut c = Cluster::start(ClusterSpec {
        aggregators: 1,
        leaves: 2,
        metrics: true,
        leaf_env,
        ..Default::default()
    })?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, 2, START)?;
    Ok((c, m))
}

/// Creates pipeline `gen` into table `db.gen` with a datagen CONFIG and runs it to its end.
fn load_datagen(c: &Cluster, m: usize, db: &str, config: &str) -> Result<()> {
    c.sql(
        m,
        &format!(
            "USE {db}; CREATE INFERRED PIPELINE gen AS LOAD DATA KAFKACONNECT 'datagen' CONFIG '{config}' FORMAT AVRO"
        ),
    )?;
    c.sql(m, &format!("USE {db}; START PIPELINE gen FOREGROUND"))?;
    Ok(())
}

/// Waits until `information_schema.COLUMNAR_SEGMENTS` lists at least `rows` rows of `db.gen`.
fn wait_for_segments(c: &Cluster, m: usize, db: &str, rows: usize) -> Result<()> {
    wait_for("the rows to reach column segments", START, || {
        let n: usize = c
            .sql(
                m,
                &format!(
                    "SELECT SUM(ROWS_COUNT) FROM information_schema.COLUMNAR_SEGMENTS WHERE DATABASE_NAME = '{db}' AND TABLE_NAME = 'gen' AND COLUMN_NAME = 'record'"
                ),
            )
            .ok()?
            .rows
            .first()?
            .first()?
            .parse()
            .ok()?;
        (n >= rows).then_some(())
    })
}

#[test]
fn the_leaves_filter_aggregate_and_limit_and_send_only_results() -> Result<()> {
    let (c, m) = cluster(vec![])?;
    setup(&c, m, "q")?;
    c.sql(m, "SET GLOBAL pipelines_extractor_batch_size = 10000")?;
    let per_task = 60_000usize;
    load_datagen(&c, m, "q", &datagen_config(per_task))?;
    let total = 2 * per_task;
    assert_eq!(count(&c, m, "q", "gen"), Some(total));
    let n = total as f64;

    // COUNT(*): each leaf counts its rows and sends one partial count.
    let (rows, w) = measured(&c, m, "SELECT COUNT(*) FROM q.gen")?;
    assert_eq!(rows, vec![vec![total.to_string()]]);
    assert_eq!(
        w,
        LeafWork {
            scanned: n,
            sent: 2.0
        },
        "COUNT(*)"
    );

    // A JSON point filter runs where the rows are: two matches (one per task) cross.
    let (rows, w) = measured(
        &c,
        m,
        "SELECT JSON_EXTRACT_BIGINT(record, 'task') t FROM q.gen WHERE JSON_EXTRACT_BIGINT(record, 'seq') = 777 ORDER BY t",
    )?;
    assert_eq!(rows, vec![vec!["0".to_string()], vec!["1".to_string()]]);
    // (Rows in column segments may be skipped unread: at most every row is read.)
    assert!(w.sent == 2.0 && w.scanned <= n, "point filter: {w:?}");

    // IN, LIKE, OR, IS [NOT] NULL, NOT, and an aggregate over them: partial counts only.
    let (rows, w) = measured(
        &c,
        m,
        "SELECT COUNT(*) FROM q.gen WHERE JSON_EXTRACT_BIGINT(record, 'seq') IN (1, 2, 3) \
         AND (JSON_EXTRACT_STRING(record, 'msg') LIKE '%' OR record IS NULL) \
         AND NOT JSON_EXTRACT_BIGINT(record, 'task') = 7 AND id IS NOT NULL",
    )?;
    assert_eq!(rows, vec![vec!["6".to_string()]]);
    // (Rows in column segments may be skipped unread: at most every row is read.)
    assert!(w.sent == 2.0 && w.scanned <= n, "compound filter: {w:?}");

    // GROUP BY with COUNT/SUM/MIN/MAX/AVG: a partial row per group and leaf, merged above.
    let (rows, w) = measured(
        &c,
        m,
        "SELECT JSON_EXTRACT_BIGINT(record, 'task') t, COUNT(*), SUM(JSON_EXTRACT_BIGINT(record, 'seq')), \
         MIN(JSON_EXTRACT_BIGINT(record, 'seq')), MAX(JSON_EXTRACT_BIGINT(record, 'seq')), \
         AVG(JSON_EXTRACT_BIGINT(record, 'seq')) FROM q.gen GROUP BY t ORDER BY t",
    )?;
    let sum = per_task * (per_task - 1) / 2;
    let avg = (per_task - 1) as f64 / 2.0;
    let group = |t: usize| {
        vec![
            t.to_string(),
            per_task.to_string(),
            sum.to_string(),
            "0".to_string(),
            (per_task - 1).to_string(),
            avg.to_string(),
        ]
    };
    assert_eq!(rows, vec![group(0), group(1)]);
    assert!(
        w.scanned == n && w.sent <= 4.0,
        "GROUP BY reads every row once: {w:?}"
    );

    // ORDER BY ... LIMIT: each leaf keeps its own top rows.
    let (rows, w) = measured(
        &c,
        m,
        "SELECT JSON_EXTRACT_BIGINT(record, 'seq') s FROM q.gen ORDER BY s DESC LIMIT 3",
    )?;
    let top = (per_task - 1).to_string();
    let next = (per_task - 2).to_string();
    assert_eq!(rows, vec![vec![top.clone()], vec![top], vec![next]]);
    assert!(w.sent <= 6.0, "ORDER BY LIMIT: {w:?}");

    // LIMIT reaches the leaves' scans: they read what they return, not the table.
    let (rows, w) = measured(&c, m, "SELECT * FROM q.gen LIMIT 10")?;
    assert_eq!(rows.len(), 10);
    assert!(w.scanned <= 20.0, "LIMIT 10 read {w:?}");

    Ok(())
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// Runs `sql` with `mariadb --quick` (rows printed as they arrive) and counts what it prints
/// without keeping it: (rows, bytes).
fn stream_query(port: u16, sql: &str) -> Result<(usize, usize)> {
    let mut child = mysql_command(port, "", sql)
        // Rows printed as they arrive, the largest of them whole.
        .args(["--quick", "--max-allowed-packet=64M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::with_capacity(1 << 20, child.stdout.take().context("stdout")?);
    let (mut rows, mut bytes) = (0, 0);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = out.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        rows += 1;
        bytes += n;
    }
    let done = child.wait_with_output()?;
    if !done.status.success() {
        bail!("{}", String::from_utf8_lossy(&done.stderr).trim());
    }
    Ok((rows, bytes))
}

#[test]
fn select_star_streams_a_table_larger_than_any_node_holds() -> Result<()> {
    // Leaves with a small page cache, flushing partitions into column segments early: what a
    // node holds is then the query's own doing.
    let (mut c, m) = cluster(vec![
        ("SHARDLINE_STORE_CACHE_MB".into(), "16".into()),
        ("SHARDLINE_SEGMENT_ROWS".into(), "20".into()),
        ("SHARDLINE_FLUSH_INTERVAL_MS".into(), "200".into()),
    ])?;
    setup(&c, m, "big")?;
    c.sql(m, "SET GLOBAL pipelines_extractor_batch_size = 50")?;
    let (per_task, payload) = (1500usize, 200_000usize);
    let config = format!(
        "{{\"connector.class\":\"io.shardline.connect.datagen.DatagenSourceConnector\",\"datagen.rate\":0,\"datagen.records\":{per_task},\"datagen.payload.bytes\":{payload},\"tasks.max\":2}}"
    );
    load_datagen(&c, m, "big", &config)?;
    let total = 2 * per_task;
    assert_eq!(count(&c, m, "big", "gen"), Some(total));
    wait_for_segments(&c, m, "big", total - 16 * 20)?;
    // Fresh processes, so each node's peak memory is the query's.
    for l in c.leaves.iter_mut() {
        l.stop()?;
        l.start()?;
    }
    c.aggregators[m].stop()?;
    c.aggregators[m].start()?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, 2, START)?;
    let peaks = |c: &Cluster| -> Result<Vec<(String, u64)>> {
        c.aggregators
            .iter()
            .chain(c.leaves.iter())
            .map(|n| {
                Ok((
                    n.name.clone(),
                    peak_rss(n.pid().context("node not running")?)?,
                ))
            })
            .collect()
    };
    println!("peak RSS per node before the query: {:?}", peaks(&c)?);
    let (rows, bytes) = wait_for("SELECT * to answer", START, || {
        stream_query(c.mysql_ports[m], "SELECT * FROM big.gen").ok()
    })?;
    let table = total * payload;
    assert_eq!(rows, total);
    assert!(
        bytes >= table,
        "{bytes} bytes printed for a {table}-byte table"
    );
    // No node may hold even its share of the table (a leaf holds half of it).
    let budget = (table / 2) as u64;
    let after = peaks(&c)?;
    println!("SELECT * of {bytes} bytes; peak RSS per node: {after:?}");
    for (name, peak) in after {
        assert!(
            peak < budget,
            "{name} peaked at {peak} bytes streaming a {table}-byte table (each leaf holds half)"
        );
    }
    // A LIMIT over a filter stops the leaves' scans once the aggregator has its rows: they
    // read what they buffer ahead (a few MiB), not the table.
    let (rows, w) = measured(
        &c,
        m,
        "SELECT id FROM big.gen WHERE JSON_EXTRACT_BIGINT(record, 'task') = 0 LIMIT 5",
    )?;
    assert_eq!(rows.len(), 5);
    assert!(
        w.scanned < (total / 4) as f64,
        "the scans went on after the LIMIT was reached: {w:?} of {total} rows"
    );
    Ok(())
}

/// Rows of `db.gen` that are the same datagen record (task, seq) loaded more than once, and
/// how many distinct records there are.
fn duplicates_and_distinct(c: &Cluster, m: usize, db: &str) -> Result<(usize, usize)> {
    let rows = c
        .sql(
            m,
            &format!(
                "SELECT COUNT(*), COUNT(DISTINCT JSON_EXTRACT_BIGINT(record, 'task') * 1000000000 + JSON_EXTRACT_BIGINT(record, 'seq')) FROM {db}.gen"
            ),
        )?
        .rows;
    let all: usize = rows[0][0].parse()?;
    let distinct: usize = rows[0][1].parse()?;
    Ok((all - distinct, distinct))
}

/// The leaf's fault hook: it aborts in its next flush at the given point.
const CRASH_IN_FLUSH: &str = "SHARDLINE_TEST_CRASH_IN_FLUSH";

#[test]
fn a_leaf_killed_mid_flush_loses_no_row_and_shows_none_twice() -> Result<()> {
    let flushing = vec![
        ("SHARDLINE_SEGMENT_ROWS".to_string(), "100".to_string()),
        ("SHARDLINE_FLUSH_INTERVAL_MS".to_string(), "100".to_string()),
    ];
    let (mut c, m) = cluster(flushing)?;
    setup(&c, m, "crash")?;
    c.sql(m, "SET GLOBAL pipelines_extractor_batch_size = 500")?;
    let per_task = 20_000usize;
    let config = format!(
        "{{\"connector.class\":\"io.shardline.connect.datagen.DatagenSourceConnector\",\"datagen.rate\":4000,\"datagen.records\":{per_task},\"tasks.max\":2}}"
    );
    c.sql(
        m,
        &format!(
            "USE crash; CREATE INFERRED PIPELINE gen AS LOAD DATA KAFKACONNECT 'datagen' CONFIG '{config}' FORMAT AVRO"
        ),
    )?;
    // Each leaf in turn dies in its next flush: one after writing the segment file but before
    // its manifest, one after the manifest but before the rows leave the row segment.
    for (leaf, at) in [(0, "before-manifest"), (1, "after-manifest")] {
        let node = &mut c.leaves[leaf];
        node.stop()?;
        node.set_env(CRASH_IN_FLUSH, Some(at));
        node.start()?;
        if leaf == 0 {
            c.wait_for_leaves_online(m, 2, START)?;
            c.sql(m, "USE crash; START PIPELINE gen")?;
        }
        wait_for(&format!("leaf-{} to die {at}", leaf + 1), START, || {
            (!c.leaves[leaf].is_running()).then_some(())
        })?;
        assert!(
            c.leaves[leaf]
                .log_text()
                .contains("aborting the leaf mid-flush"),
            "leaf-{} died of something else",
            leaf + 1
        );
        let node = &mut c.leaves[leaf];
        node.set_env(CRASH_IN_FLUSH, None);
        node.start()?;
        c.wait_for_leaves_online(m, 2, START)?;
        // Queried while the other leaf loads and this one recovers: never a row twice.
        let (dups, _) = wait_for("the restarted leaf to answer", START, || {
            duplicates_and_distinct(&c, m, "crash").ok()
        })?;
        assert_eq!(dups, 0, "rows shown twice after the crash {at}");
    }
    let total = 2 * per_task;
    wait_for("every record", Duration::from_secs(120), || {
        (count(&c, m, "crash", "gen") == Some(total)).then_some(())
    })?;
    assert_eq!(duplicates_and_distinct(&c, m, "crash")?, (0, total));
    // The rows live in column segments now, and the table lists them.
    wait_for_segments(&c, m, "crash", total - 16 * 100)?;
    assert_eq!(duplicates_and_distinct(&c, m, "crash")?, (0, total));
    // DROP TABLE takes the segments with it.
    c.sql(m, "USE crash; STOP PIPELINE gen")?;
    c.sql(m, "USE crash; DROP PIPELINE gen")?;
    c.sql(m, "USE crash; DROP TABLE gen")?;
    wait_for(
        "the segment files of the dropped table to go",
        START,
        || {
            c.leaves
                .iter()
                .all(|l| {
                    let dir = l.data_dir().join("store").join("segments");
                    std::fs::read_dir(&dir).map_or(true, |mut d| d.next().is_none())
                })
                .then_some(())
        },
    )?;
    Ok(())
}

#[test]
fn records_of_a_mebibyte_go_through_the_spec_queries() -> Result<()> {
    use crate::harness::Moto;
    use crate::pipelines::{create_pipeline_sql, create_stream, put_records, runtime};
    // One leaf holds them all: more than one message could carry (256 MiB).
    let sim = Moto::sim(&["--no-limits"])?;
    let mut env = sim.leaf_env();
    env.push(("SHARDLINE_SEGMENT_ROWS".into(), "16".into()));
    env.push(("SHARDLINE_FLUSH_INTERVAL_MS".into(), "200".into()));
    let mut c = Cluster::start(ClusterSpec {
        aggregators: 1,
        leaves: 1,
        leaf_env: env,
        ..Default::default()
    })?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, 1, START)?;
    setup(&c, m, "mib")?;
    c.sql(m, "SET GLOBAL pipelines_extractor_batch_size = 8")?;
    let rt = runtime();
    let kinesis = sim.client();
    rt.block_on(create_stream(&kinesis, "big-records", 1))?;
    let n = 200usize;
    let key = |seq: usize| if seq % 100 == 4 { "user-c" } else { "user-b" };
    // Kinesis's largest record: data plus partition key of 1 MiB.
    let payloads: Vec<(String, Vec<u8>)> = (0..n)
        .map(|seq| {
            let head = format!(r#"{{"seq":{seq},"msg":""#);
            let pad = 1024 * 1024 - key(seq).len() - head.len() - 2;
            let data = format!("{head}{}\"}}", "m".repeat(pad));
            assert_eq!(data.len() + key(seq).len(), 1024 * 1024);
            (key(seq).to_string(), data.into_bytes())
        })
        .collect();
    for chunk in payloads.chunks(4) {
        rt.block_on(put_records(&kinesis, "big-records", chunk))?;
    }
    c.sql(
        m,
        &format!(
            "USE mib; {}",
            create_pipeline_sql("kinesis_pipeline", "big-records", 1)
        ),
    )?;
    c.sql(m, "USE mib; START PIPELINE kinesis_pipeline")?;
    wait_for("every record", Duration::from_secs(180), || {
        (count(&c, m, "mib", "kinesis_pipeline") == Some(n)).then_some(())
    })?;
    let port = c.mysql_ports[m];
    // The spec's queries, as written.
    let (rows, _) = stream_query(
        port,
        "SELECT topic, JSON_EXTRACT_STRING(record, 'partitionKey') AS partition_key, JSON_EXTRACT_STRING(record, 'sequenceNumber') AS seq_no, JSON_EXTRACT_STRING(record, 'shardId') AS shard_id FROM mib.kinesis_pipeline",
    )?;
    assert_eq!(rows, n);
    let (rows, bytes) = stream_query(
        port,
        "SELECT * FROM mib.kinesis_pipeline WHERE JSON_EXTRACT_STRING(record, 'partitionKey') = 'user-c'",
    )?;
    assert_eq!(rows, 2, "two records have key user-c");
    assert!(bytes > 2 * 1024 * 1024, "whole records: {bytes} bytes");
    let (rows, bytes) = stream_query(
        port,
        "SELECT topic, JSON_EXTRACT_STRING(id, 'partitionKey') AS id_partition_key, \
         JSON_EXTRACT_STRING(record, 'partitionKey') AS partition_key, \
         JSON_EXTRACT_STRING(record, 'sequenceNumber') AS sequence_number, \
         JSON_EXTRACT_STRING(record, 'shardId') AS shard_id, \
         JSON_EXTRACT_STRING(record, 'streamName') AS stream_name, \
         JSON_EXTRACT_BIGINT(record, 'approximateArrivalTimestamp') AS arrival_ts_ms, \
         JSON_EXTRACT_BIGINT(FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')), 'seq') AS seq, \
         JSON_EXTRACT_STRING(FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')), 'msg') AS msg \
         FROM mib.kinesis_pipeline",
    )?;
    assert_eq!(rows, n);
    assert!(bytes > n * 1_000_000, "every msg whole: {bytes} bytes");
    c.sql(m, "USE mib; ALTER TABLE kinesis_pipeline ADD COLUMN partition_key AS JSON_EXTRACT_STRING(record, 'partitionKey') PERSISTED VARCHAR(128)")?;
    c.sql(m, "USE mib; ALTER TABLE kinesis_pipeline ADD COLUMN seq AS JSON_EXTRACT_BIGINT(FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')), 'seq') PERSISTED BIGINT")?;
    c.sql(m, "USE mib; ALTER TABLE kinesis_pipeline ADD COLUMN msg AS JSON_EXTRACT_STRING(FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')), 'msg') PERSISTED VARCHAR(512)")?;
    let got = c
        .sql(
            m,
            "SELECT topic, partition_key, seq, LENGTH(msg), LENGTH(record) > 1000000 FROM mib.kinesis_pipeline WHERE seq > 197 ORDER BY seq",
        )?
        .rows;
    assert_eq!(
        got,
        vec![
            vec!["kinesis-topic", "user-b", "198", "512", "1"],
            vec!["kinesis-topic", "user-b", "199", "512", "1"],
        ]
    );
    Ok(())
}

/// Counters of the leaves' segment skipping, summed.
/// Counters summed over the leaves.
/// The sums over the nodes at `ports` of the named counters.
fn counters<const N: usize>(ports: &[u16], names: [&str; N]) -> Result<[f64; N]> {
    let mut out = [0.0; N];
    for port in ports {
        let text = scrape(*port)?;
        for (o, name) in out.iter_mut().zip(names) {
            *o += metric_sum(&text, name);
        }
    }
    Ok(out)
}

fn leaf_counters<const N: usize>(c: &Cluster, names: [&str; N]) -> Result<[f64; N]> {
    counters(c.leaf_metrics_ports(), names)
}

fn skipped(c: &Cluster) -> Result<(f64, f64)> {
    let [segments, groups] = leaf_counters(
        c,
        [
            "shardline_leaf_segments_skipped_total",
            "shardline_leaf_row_groups_skipped_total",
        ],
    )?;
    Ok((segments, groups))
}

/// JSON values the leaves' scans read from sub-columns, and computed from the JSON text.
fn json_values(c: &Cluster) -> Result<(f64, f64)> {
    let [subs, computed] = leaf_counters(
        c,
        [
            "shardline_leaf_json_values_from_sub_columns_total",
            "shardline_leaf_json_values_computed_total",
        ],
    )?;
    Ok((subs, computed))
}

#[test]
fn json_filters_read_sub_columns_and_skip_segments() -> Result<()> {
    let (c, m) = cluster(vec![
        ("SHARDLINE_SEGMENT_ROWS".into(), "500".into()),
        ("SHARDLINE_FLUSH_INTERVAL_MS".into(), "100".into()),
    ])?;
    setup(&c, m, "sub")?;
    c.sql(m, "SET GLOBAL pipelines_extractor_batch_size = 1000")?;
    let per_task = 20_000usize;
    load_datagen(&c, m, "sub", &datagen_config(per_task))?;
    let total = 2 * per_task;
    wait_for_segments(&c, m, "sub", total - 16 * 500)?;
    // Every segment keeps the record's keys as typed sub-columns, without an ALTER.
    let paths = c
        .sql(
            m,
            "SELECT KEY_PATH, TYPE, MIN(PRESENT_COUNT = ROWS_COUNT) FROM information_schema.JSON_COLUMN_SCHEMA WHERE DATABASE_NAME = 'sub' AND COLUMN_NAME = 'record' GROUP BY KEY_PATH, TYPE ORDER BY KEY_PATH",
        )?
        .rows;
    assert_eq!(
        paths,
        vec![
            vec!["msg", "STRING", "1"],
            vec!["seq", "BIGINT", "1"],
            vec!["task", "BIGINT", "1"],
        ]
    );
    // A point filter reads the sub-column, skips the row groups whose seq range misses, and
    // decodes the JSON text of the matching rows only. Its answer is the JSON text's.
    let before = skipped(&c)?;
    let (rows, w) = measured(
        &c,
        m,
        "SELECT COUNT(*), MIN(JSON_EXTRACT_STRING(record, 'msg')) FROM sub.gen WHERE JSON_EXTRACT_BIGINT(record, 'seq') = 12345",
    )?;
    let after = skipped(&c)?;
    let by_text = c
        .sql(
            m,
            "SELECT COUNT(*), MIN(JSON_EXTRACT_STRING(record, 'msg')) FROM sub.gen WHERE JSON_EXTRACT_JSON(record, 'seq') = '12345'",
        )?
        .rows;
    assert_eq!(rows, by_text);
    assert_eq!(rows[0][0], "2");
    assert!(
        after.0 + after.1 > before.0 + before.1,
        "no segment or row group was skipped: {before:?} -> {after:?}"
    );
    assert!(
        w.scanned < (total / 4) as f64,
        "the point filter decoded {w:?} of {total} rows"
    );
    // Ranges, strings and ANDs of them alike.
    let count = |w: &str| -> Result<String> {
        Ok(
            c.sql(m, &format!("SELECT COUNT(*) FROM sub.gen WHERE {w}"))?
                .rows[0][0]
                .clone(),
        )
    };
    assert_eq!(
        count("JSON_EXTRACT_BIGINT(record, 'seq') BETWEEN 100 AND 199")?,
        "200"
    );
    assert_eq!(
        count("JSON_EXTRACT_BIGINT(record, 'seq') >= 19990 AND JSON_EXTRACT_BIGINT(record, 'task') = 1")?,
        "10"
    );
    let msg = &c
        .sql(
            m,
            "SELECT JSON_EXTRACT_STRING(record, 'msg') FROM sub.gen WHERE JSON_EXTRACT_BIGINT(record, 'seq') = 7 AND JSON_EXTRACT_BIGINT(record, 'task') = 0",
        )?
        .rows[0][0];
    assert_eq!(
        count(&format!("JSON_EXTRACT_STRING(record, 'msg') = '{msg}'"))?,
        count(&format!("JSON_EXTRACT_JSON(record, 'msg') = '\"{msg}\"'"))?
    );
    // GROUP BY and aggregates over JSON keys read the sub-columns: the JSON text of no row in
    // a column segment is parsed, only the row segment's (at most 16 partitions x 500 rows).
    let group_by = |task: &str, seq: &str| -> Result<Vec<Vec<String>>> {
        Ok(c.sql(
            m,
            &format!(
                "SELECT {task} AS t, COUNT(*), SUM({seq}), MAX(JSON_EXTRACT_STRING(record, 'msg')) FROM sub.gen GROUP BY t ORDER BY t"
            ),
        )?
        .rows)
    };
    let before = json_values(&c)?;
    let by_subs = group_by(
        "JSON_EXTRACT_BIGINT(record, 'task')",
        "JSON_EXTRACT_BIGINT(record, 'seq')",
    )?;
    let after = json_values(&c)?;
    let tail = 16.0 * 500.0;
    assert!(
        after.0 - before.0 >= 3.0 * (total as f64 - tail) && after.1 - before.1 <= 3.0 * tail,
        "GROUP BY read {} values from sub-columns and computed {}",
        after.0 - before.0,
        after.1 - before.1
    );
    // The same answer as the JSON text's (an argument that is not a column is not rewritten).
    let by_text = group_by(
        "JSON_EXTRACT_BIGINT(CONCAT(record, ''), 'task')",
        "JSON_EXTRACT_BIGINT(CONCAT(record, ''), 'seq')",
    )?;
    assert_eq!(by_subs, by_text);
    // So does a COUNT(*) under a point filter (DataFusion folds the projection into the
    // filter there): the two matching rows' values come from the sub-column (the filter
    // itself runs on the sub-column inside the segment reader), none from JSON text.
    let before = json_values(&c)?;
    assert_eq!(count("JSON_EXTRACT_BIGINT(record, 'seq') = 4321")?, "2");
    let after = json_values(&c)?;
    assert!(
        after.0 - before.0 == 2.0 && after.1 - before.1 <= tail,
        "COUNT(*) WHERE read {} values from sub-columns and computed {}",
        after.0 - before.0,
        after.1 - before.1
    );
    let half = (per_task * (per_task - 1) / 2).to_string();
    assert_eq!(by_subs.len(), 2, "{by_subs:?}");
    assert_eq!(by_subs[0][..3], ["0", &*per_task.to_string(), &*half]);
    Ok(())
}
