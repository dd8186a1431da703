//! Scenario 8 of the exactly-once issue: aggregator identity and membership. A wiped member is
//! refused and replaced (REMOVE AGGREGATOR, ADD AGGREGATOR, a new node) while a pipeline loads,
//! and leaves follow the group when every aggregator they were started with is replaced.

use crate::harness::{wait_for, Cluster, ClusterSpec, Moto};
use crate::pipelines::{
    count, create_pipeline_sql, create_stream, pipeline_cluster, put_records, runtime, START,
};
use crate::scenarios::all_loaded_once;
use anyhow::Result;
use std::time::Duration;

/// A 3-aggregator, 2-leaf cluster on kinesis-sim with pipeline `<db>_pipeline` running over
/// stream `<db>-stream` of `shards` shards: (simulator, runtime, client, cluster, master).
fn running_kinesis_pipeline(
    db: &str,
    shards: i32,
) -> Result<(
    Moto,
    tokio::runtime::Runtime,
    aws_sdk_kinesis::Client,
    Cluster,
    usize,
)> {
    let sim = Moto::sim(&[])?;
    let rt = runtime();
    let kinesis = sim.client();
    let (c, m) = pipeline_cluster(&sim, ClusterSpec::default(), db)?;
    let stream = format!("{db}-stream");
    rt.block_on(create_stream(&kinesis, &stream, shards))?;
    let sql = create_pipeline_sql(&format!("{db}_pipeline"), &stream, shards as u32);
    c.sql(m, &format!("USE {db}; {sql}"))?;
    c.sql(m, &format!("USE {db}; START PIPELINE {db}_pipeline"))?;
    Ok((sim, rt, kinesis, c, m))
}

/// `n` records tagged `tag`.
fn tagged(tag: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| (format!("{tag}-{i}"), format!("{tag}-{i}").into_bytes()))
        .collect()
}

/// Scenario 8: an aggregator whose data directory is wiped must not rejoin the Raft group under
/// its old id (it has forgotten its vote and the entries it acknowledged, so with it a quorum
/// could lose a committed batch: offsets go back, records load twice). It refuses to start and
/// says how to replace it; the replacement (REMOVE AGGREGATOR, ADD AGGREGATOR under a new id,
/// start the new node) keeps the pipeline loading each record once, through a master kill
/// after it. Before, the wiped member started and rejoined as if nothing had happened.
#[test]
fn a_wiped_aggregator_is_refused_and_replaced_while_a_pipeline_loads() -> Result<()> {
    let (_sim, rt, kinesis, mut c, m) = running_kinesis_pipeline("replace", 2)?;
    let put_batch =
        |tag: &str| rt.block_on(put_records(&kinesis, "replace-stream", &tagged(tag, 50)));
    let mut put = put_batch("first")?;
    wait_for("the first records", START, || {
        (count(&c, m, "replace", "replace_pipeline")? >= put.len()).then_some(())
    })?;

    let wiped = (m + 1) % 3;
    c.aggregators[wiped].kill();
    std::fs::remove_dir_all(c.aggregators[wiped].data_dir())?;
    put.extend(put_batch("while-down")?);
    c.aggregators[wiped].start()?;
    let code = c.wait_for_exit(wiped, Duration::from_secs(20))?;
    assert_ne!(code, Some(0), "a wiped member must refuse to start");
    assert!(c.aggregators[wiped]
        .log_text()
        .contains("REMOVE AGGREGATOR"));

    let fresh = c.replace_aggregator(m, wiped)?;
    put.extend(put_batch("replaced")?);
    wait_for("the new member to answer queries", START, || {
        (count(&c, fresh, "replace", "replace_pipeline")? >= put.len()).then_some(())
    })
    .inspect_err(|_| c.failed())?;

    // The old master dies: the remaining old member and the new one elect a master and the
    // pipeline goes on.
    c.aggregators[m].kill();
    let m2 = c.wait_for_master(START)?;
    put.extend(put_batch("after")?);
    all_loaded_once(&c, m2, "replace", "replace_pipeline", &put)
}

/// Scenario 8, the whole group replaced: every aggregator the leaves were started with
/// (`--aggregators`) is removed, one by one, and new ones added. The leaves follow the group's
/// membership from the master's heartbeat answers, so the pipeline goes on loading with none of
/// their configured aggregators left. Before, the leaves kept calling the addresses they were
/// started with, found no aggregator, and ingestion stopped for good (seen in the long chaos run).
#[test]
fn leaves_follow_the_group_when_every_aggregator_they_knew_is_replaced() -> Result<()> {
    let (_sim, rt, kinesis, mut c, _) = running_kinesis_pipeline("group", 2)?;
    let put_batch =
        |tag: &str| rt.block_on(put_records(&kinesis, "group-stream", &tagged(tag, 40)));
    let mut put = put_batch("start")?;
    for old in 0..3 {
        // The master can't remove itself: stop it first, the others elect a new one.
        if c.wait_for_master(START)? == old {
            c.aggregators[old].kill();
        }
        let via = c.wait_for_master(START)?;
        c.aggregators[old].kill();
        let fresh = c.replace_aggregator(via, old)?;
        wait_for("the new member to answer", START, || {
            count(&c, fresh, "group", "group_pipeline").map(|_| ())
        })
        .inspect_err(|_| c.failed())?;
        put.extend(put_batch(&format!("round-{old}"))?);
    }
    let m = c.wait_for_master(START)?;
    assert!(m >= 3, "the master is one of the new aggregators");
    c.wait_for_leaves_online(m, 2, START)?;
    // A leaf restarted now finds the group too: it remembers the members it last heard of.
    c.leaves[0].kill();
    put.extend(put_batch("restart")?);
    c.leaves[0].start()?;
    wait_for("the restarted leaf to register again", START, || {
        c.leaves[0]
            .log_text()
            .matches("registered with the cluster")
            .nth(1)
            .map(|_| ())
    })
    .inspect_err(|_| c.failed())?;
    c.wait_for_leaves_online(m, 2, START)?;
    put.extend(put_batch("end")?);
    all_loaded_once(&c, m, "group", "group_pipeline", &put)
}
