//! Queries over tables on the leaves: the leaves filter, project, aggregate and limit what they
//! hold, results stream to the client, and the leaves' counters show what stayed on them.

use crate::harness::{metric_sum, scrape, wait_for, Cluster, ClusterSpec};
use crate::pipelines::{count, datagen_config, setup, START};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

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

#[test]
fn the_leaves_filter_aggregate_and_limit_and_send_only_results() -> Result<()> {
    let (c, m) = cluster(vec![])?;
    setup(&c, m, "q")?;
    c.sql(m, "SET GLOBAL pipelines_extractor_batch_size = 10000")?;
    let per_task = 60_000usize;
    c.sql(
        m,
        &format!(
            "USE q; CREATE INFERRED PIPELINE gen AS LOAD DATA KAFKACONNECT 'datagen' CONFIG '{}' FORMAT AVRO",
            datagen_config(per_task)
        ),
    )?;
    c.sql(m, "USE q; START PIPELINE gen FOREGROUND")?;
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
    assert_eq!(
        w,
        LeafWork {
            scanned: n,
            sent: 2.0
        },
        "point filter"
    );

    // IN, LIKE, OR, IS [NOT] NULL, NOT, and an aggregate over them: partial counts only.
    let (rows, w) = measured(
        &c,
        m,
        "SELECT COUNT(*) FROM q.gen WHERE JSON_EXTRACT_BIGINT(record, 'seq') IN (1, 2, 3) \
         AND (JSON_EXTRACT_STRING(record, 'msg') LIKE '%' OR record IS NULL) \
         AND NOT JSON_EXTRACT_BIGINT(record, 'task') = 7 AND id IS NOT NULL",
    )?;
    assert_eq!(rows, vec![vec!["6".to_string()]]);
    assert_eq!(
        w,
        LeafWork {
            scanned: n,
            sent: 2.0
        },
        "compound filter"
    );

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
    assert!(w.scanned == n && w.sent <= 4.0, "GROUP BY: {w:?}");

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
    let mut child = Command::new("mariadb")
        .args([
            "-h127.0.0.1",
            &format!("-P{port}"),
            "-uroot",
            "--batch",
            "--skip-column-names",
            "--quick",
            "--max-allowed-packet=64M",
        ])
        .args(["-e", sql])
        .stdin(Stdio::null())
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
    c.sql(
        m,
        &format!(
            "USE big; CREATE INFERRED PIPELINE gen AS LOAD DATA KAFKACONNECT 'datagen' CONFIG '{config}' FORMAT AVRO"
        ),
    )?;
    c.sql(m, "USE big; START PIPELINE gen FOREGROUND")?;
    let total = 2 * per_task;
    assert_eq!(count(&c, m, "big", "gen"), Some(total));
    wait_for("the rows to reach column segments", START, || {
        let flushed: f64 = c
            .leaf_metrics_ports()
            .iter()
            .filter_map(|p| scrape(*p).ok())
            .map(|t| metric_sum(&t, "shardline_leaf_segment_rows_flushed_total"))
            .sum();
        (flushed as usize >= total - 16 * 20).then_some(())
    })?;
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
