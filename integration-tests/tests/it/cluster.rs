//! The cluster foundation: election, failover, restarts, snapshots, leaf liveness.

use crate::harness::{wait_for, Cluster, ClusterSpec};
use anyhow::Result;
use std::time::{Duration, Instant};

const START: Duration = Duration::from_secs(30);

fn variable(c: &Cluster, i: usize, name: &str) -> Result<String> {
    let out = c.sql(i, &format!("SHOW GLOBAL VARIABLES LIKE '{name}'"))?;
    Ok(out.rows.first().map(|r| r[1].clone()).unwrap_or_default())
}

#[test]
fn three_aggregators_elect_one_master_and_agree() -> Result<()> {
    let mut c = Cluster::start(ClusterSpec::default())?;
    let master = c.wait_for_master(START)?;
    for i in 0..3 {
        let rows = c.sql(i, "SHOW AGGREGATORS")?.rows;
        assert_eq!(rows.len(), 3, "{rows:?}");
        let masters: Vec<&Vec<String>> = rows.iter().filter(|r| r[5] == "1").collect();
        assert_eq!(masters.len(), 1, "exactly one master in {rows:?}");
        assert_eq!(masters[0][6], (master + 1).to_string());
        // Every aggregator reports its MySQL port.
        let ports: Vec<String> = rows.iter().map(|r| r[1].clone()).collect();
        let expected: Vec<String> = c.mysql_ports.iter().map(|p| p.to_string()).collect();
        assert_eq!(ports, expected);
    }
    c.wait_for_leaves_online(0, 2, START)?;
    Ok(())
}

#[test]
fn master_failover_keeps_writes_and_the_old_master_rejoins() -> Result<()> {
    let mut c = Cluster::start(ClusterSpec::default())?;
    let old = c.wait_for_master(START)?;
    c.wait_for_leaves_online(old, 2, START)?;
    c.sql(
        old,
        r#"SET GLOBAL experimental_features_config = "kafka_connect_enabled=true""#,
    )?;
    let follower = (old + 1) % 3;
    c.sql(follower, "CREATE DATABASE before_failover PARTITIONS 2")?;

    c.aggregators[old].kill();
    let killed = Instant::now();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let new = wait_for("a new master", Duration::from_secs(10), || {
        let m = c.master_seen_by(survivors[0])?;
        (m != old + 1 && Some(m) == c.master_seen_by(survivors[1])).then_some(m - 1)
    })?;
    let failover = killed.elapsed();
    println!("failover: new master {} after {failover:?}", new + 1);
    assert!(
        failover < Duration::from_secs(3),
        "new master took {failover:?}"
    );

    for i in &survivors {
        assert_eq!(
            variable(&c, *i, "experimental_features_config")?,
            "kafka_connect_enabled=true"
        );
        let dbs = c.sql(*i, "SHOW DATABASES")?.rows.concat();
        assert!(dbs.contains(&"before_failover".to_string()), "{dbs:?}");
    }
    // Writes after the failover succeed through any aggregator, follower or master.
    for (n, i) in survivors.iter().enumerate() {
        c.sql(
            *i,
            &format!("SET GLOBAL pipelines_batch_interval = {}", 3000 + n),
        )?;
        for j in &survivors {
            assert_eq!(
                variable(&c, *j, "pipelines_batch_interval")?,
                (3000 + n).to_string()
            );
        }
    }

    // The old master comes back as a follower and catches up.
    c.aggregators[old].start()?;
    wait_for("the old master to rejoin", START, || {
        (c.master_seen_by(old)? == new + 1
            && variable(&c, old, "pipelines_batch_interval").ok()? == "3001")
            .then_some(())
    })?;
    assert_eq!(c.wait_for_master(START)?, new);
    Ok(())
}

#[test]
fn full_cluster_restart_keeps_variables_and_databases() -> Result<()> {
    let mut c = Cluster::start(ClusterSpec::default())?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, 2, START)?;
    c.sql(
        m,
        r#"SET GLOBAL experimental_features_config = "kafka_connect_enabled=true""#,
    )?;
    c.sql(m, "SET GLOBAL pipelines_extractor_batch_size = 10000")?;
    c.sql(m, "CREATE DATABASE kept PARTITIONS 3")?;
    let partitions = c.sql(m, "SHOW PARTITIONS ON kept")?.rows;
    assert_eq!(partitions.len(), 3);

    // A clean stop of everything, then SIGKILL-style loss is covered by the next round.
    for n in c.aggregators.iter_mut().chain(c.leaves.iter_mut()) {
        n.stop()?;
    }
    for n in c.aggregators.iter_mut().chain(c.leaves.iter_mut()) {
        n.start()?;
    }
    let m = c.wait_for_master(START)?;
    for round in 0..2 {
        for i in 0..3 {
            wait_for("variables after restart", START, || {
                (variable(&c, i, "experimental_features_config").ok()?
                    == "kafka_connect_enabled=true")
                    .then_some(())
            })?;
            assert_eq!(variable(&c, i, "pipelines_extractor_batch_size")?, "10000");
            assert_eq!(c.sql(i, "SHOW PARTITIONS ON kept")?.rows, partitions);
        }
        if round == 0 {
            // Now lose every node at once.
            for n in c.aggregators.iter_mut().chain(c.leaves.iter_mut()) {
                n.kill();
            }
            for n in c.aggregators.iter_mut().chain(c.leaves.iter_mut()) {
                n.start()?;
            }
            c.wait_for_master(START)?;
        }
    }
    c.wait_for_leaves_online(m, 2, START)?;
    Ok(())
}

#[test]
fn a_member_behind_the_compacted_log_catches_up_by_snapshot_and_a_wiped_one_is_replaced(
) -> Result<()> {
    let spec = ClusterSpec {
        aggregator_args: vec!["--raft-snapshot-entries".into(), "5".into()],
        ..Default::default()
    };
    let mut c = Cluster::start(spec)?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, 2, START)?;
    let lagging = (m + 1) % 3;
    c.aggregators[lagging].stop()?;
    for n in 0..25 {
        c.sql(
            m,
            &format!("SET GLOBAL pipelines_batch_interval = {}", 1000 + n),
        )?;
    }
    c.sql(m, "CREATE DATABASE while_down PARTITIONS 1")?;
    assert!(
        c.aggregators[m]
            .log_text()
            .contains("compacted the raft log"),
        "the master should have compacted its log"
    );

    // 1. Down while the log was compacted.
    c.aggregators[lagging].start()?;
    wait_for("the lagging member to catch up", START, || {
        (variable(&c, lagging, "pipelines_batch_interval").ok()? == "1024").then_some(())
    })?;
    assert!(
        c.aggregators[lagging]
            .log_text()
            .contains("installed a catalog snapshot"),
        "catch-up should have come by snapshot"
    );
    let dbs = c.sql(lagging, "SHOW DATABASES")?.rows.concat();
    assert!(dbs.contains(&"while_down".to_string()));

    // 2. Wiped: its data directory is gone. It has forgotten its vote and what it acknowledged,
    // so it must not rejoin under its old id: it refuses to start, and says how to replace it.
    c.aggregators[lagging].kill();
    std::fs::remove_dir_all(c.aggregators[lagging].data_dir())?;
    c.sql(m, "SET GLOBAL pipelines_batch_interval = 4321")?;
    c.aggregators[lagging].start()?;
    let code = c.wait_for_exit(lagging, Duration::from_secs(20))?;
    assert_ne!(code, Some(0), "a wiped member must not start");
    let log = c.aggregators[lagging].log_text();
    assert!(
        log.contains("has joined this cluster before") && log.contains("REMOVE AGGREGATOR"),
        "the refusal should say why and what to do: {}",
        log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );

    // 3. Replaced through a configuration change: remove the old id, add a new node.
    let old_id = lagging + 1;
    c.sql(m, &format!("REMOVE AGGREGATOR {old_id}"))?;
    let new_id = c.aggregators.len() as u64 + 1;
    let fresh = c.add_aggregator(new_id)?;
    let grpc = c.aggregators[fresh]
        .arg("--grpc-listen")
        .unwrap()
        .to_string();
    let (host, port) = grpc.split_once(':').unwrap();
    c.sql(m, &format!("ADD AGGREGATOR {new_id} '{host}':{port}"))?;
    c.aggregators[fresh].start()?;
    wait_for("the new member to catch up", START, || {
        (variable(&c, fresh, "pipelines_batch_interval").ok()? == "4321").then_some(())
    })?;
    let dbs = c.sql(fresh, "SHOW DATABASES")?.rows.concat();
    assert!(dbs.contains(&"while_down".to_string()));
    let ids: Vec<String> = c
        .sql(m, "SHOW AGGREGATORS")?
        .rows
        .iter()
        .map(|r| r[6].clone())
        .collect();
    assert!(
        !ids.contains(&old_id.to_string()) && ids.contains(&new_id.to_string()) && ids.len() == 3,
        "SHOW AGGREGATORS should list the new member instead of the old: {ids:?}"
    );
    // The removed id can never come back.
    let again = c.sql(m, &format!("ADD AGGREGATOR {old_id} '127.0.0.1':1"));
    assert!(
        again.is_err_and(|e| e.to_string().contains("can't be used again")),
        "a removed id must not be added again"
    );
    // The group has a quorum without the old member: the master can die and the new member
    // and the remaining old one elect a new one between them.
    c.aggregators[m].kill();
    let m2 = c.wait_for_master(START)?;
    assert!(m2 != m && m2 != lagging);
    c.sql(m2, "SET GLOBAL pipelines_batch_interval = 999")?;
    wait_for("every live member to apply a write", START, || {
        [fresh, 3 - m - lagging]
            .iter()
            .all(|i| variable(&c, *i, "pipelines_batch_interval").ok().as_deref() == Some("999"))
            .then_some(())
    })?;
    Ok(())
}

#[test]
fn a_killed_leaf_goes_offline_and_comes_back() -> Result<()> {
    let mut c = Cluster::start(ClusterSpec::default())?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, 2, START)?;
    let before = c.leaf_states(m)?;
    c.leaves[0].kill();
    let killed = Instant::now();
    let port = c.leaves[0]
        .log_text()
        .lines()
        .find_map(|l| {
            l.split("advertise=")
                .nth(1)
                .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
        })
        .unwrap_or_default();
    wait_for(
        "the killed leaf to show offline",
        Duration::from_secs(6),
        || {
            let states = c.leaf_states(m).ok()?;
            (states.iter().filter(|(_, s)| s == "offline").count() == 1).then_some(())
        },
    )?;
    let took = killed.elapsed();
    println!("leaf {port} offline after {took:?}");
    // Default timeout is 2 s of silence, checked every 100 ms; allow for the client's polling.
    assert!(took < Duration::from_secs(4), "offline after {took:?}");
    // Every aggregator sees the same, once the state change has reached it: a follower applies
    // the entry when it learns the commit index, with the master's next message.
    for i in 0..3 {
        let seen = wait_for(
            &format!("aggregator {i} to see the leaf offline"),
            Duration::from_secs(3),
            || {
                let states = c.leaf_states(i).ok()?;
                (states.iter().filter(|(_, s)| s == "offline").count() == 1).then_some(())
            },
        );
        assert!(seen.is_ok(), "{:?}: {:?}", seen, c.leaf_states(i));
    }
    c.leaves[0].start()?;
    c.wait_for_leaves_online(m, 2, START)?;
    // Same ids and addresses as before: the leaf came back, it did not join as a new one.
    assert_eq!(c.leaf_states(m)?, before);
    Ok(())
}

#[test]
fn writes_fail_clearly_without_a_quorum_and_reads_keep_working() -> Result<()> {
    let spec = ClusterSpec {
        aggregator_args: vec!["--commit-timeout-ms".into(), "2000".into()],
        ..Default::default()
    };
    let mut c = Cluster::start(spec)?;
    let m = c.wait_for_master(START)?;
    let survivor = (m + 1) % 3;
    // Written through the survivor, which therefore has applied it (read-your-writes).
    c.sql(survivor, "SET GLOBAL pipelines_batch_interval = 1234")?;
    for i in 0..3 {
        if i != survivor {
            c.aggregators[i].kill();
        }
    }
    let started = Instant::now();
    let err = c
        .sql(survivor, "SET GLOBAL pipelines_batch_interval = 99")
        .expect_err("no quorum: the write must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("ERROR 1205") || msg.contains("ERROR 1105"),
        "{msg}"
    );
    assert!(msg.contains("master") || msg.contains("retry"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(8));
    // The node keeps serving reads.
    assert_eq!(variable(&c, survivor, "pipelines_batch_interval")?, "1234");
    assert_eq!(
        c.sql(survivor, "SELECT 1")?.rows,
        vec![vec!["1".to_string()]]
    );
    Ok(())
}
