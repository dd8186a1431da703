//! Nodes that stop answering without dying (frozen by SIGSTOP, as when cut off from the
//! network) or die between applying a write and answering it: masters, aggregators cut off
//! from the master, leaves under a query, a task's earlier run reporting late.

use super::*;

/// Scenario 10: the master stops answering (frozen: its calls time out, as when it is cut off
/// from the network). Leaves move to the new master soon after the election, and ingestion
/// goes on while the old one is still frozen. Before, a leaf took the timeout (`CANCELLED`) as
/// a final answer and kept calling the old master: the new one declared every leaf offline,
/// ingestion stopped and every query failed until the old master came back.
#[test]
fn leaves_follow_the_new_master_while_the_old_one_is_frozen() -> Result<()> {
    let (mut c, m) = ready_cluster(ClusterSpec::default(), "frozen")?;
    c.sql(
        m,
        "USE frozen; CREATE INFERRED PIPELINE gen AS LOAD DATA KAFKACONNECT 'datagen' CONFIG '{\"connector.class\":\"io.shardline.connect.datagen.DatagenSourceConnector\",\"datagen.rate\":200,\"datagen.records\":1000000,\"tasks.max\":2}' FORMAT AVRO",
    )?;
    c.sql(m, "USE frozen; START PIPELINE gen")?;
    wait_for("rows", START, || {
        (count(&c, m, "frozen", "gen")? > 0).then_some(())
    })?;
    let pid = c.aggregators[m].pid().expect("master pid");
    crate::harness::signal(pid, "STOP")?;
    let frozen_at = std::time::Instant::now();
    let others: Vec<usize> = (0..c.aggregators.len()).filter(|i| *i != m).collect();
    let result = (|| -> Result<()> {
        let new = wait_for("a new master", START, || {
            let seen: Vec<Option<usize>> = others.iter().map(|i| c.master_seen_by(*i)).collect();
            let first = seen.first().copied().flatten()?;
            (first != m + 1 && seen.iter().all(|s| *s == Some(first))).then_some(first - 1)
        })?;
        let elected = frozen_at.elapsed();
        let before = wait_for(
            "a full count on the new master",
            Duration::from_secs(10),
            || count(&c, new, "frozen", "gen"),
        )?;
        wait_for(
            "ingestion on the new master",
            Duration::from_secs(10),
            || (count(&c, new, "frozen", "gen")? > before).then_some(()),
        )?;
        println!(
            "master frozen: new master after {elected:?}, ingestion going on after {:?}",
            frozen_at.elapsed()
        );
        c.wait_for_leaves_online(new, 2, Duration::from_secs(1))?;
        Ok(())
    })();
    let old = m;
    let judged_lost = |c: &crate::harness::Cluster| {
        c.aggregators[old]
            .log_text()
            .matches("leaf lost: no heartbeat")
            .count()
    };
    let lost_before = judged_lost(&c);
    crate::harness::signal(pid, "CONT")?;
    let resumed = std::time::Instant::now();
    result.inspect_err(|_| c.failed())?;
    let m = c.wait_for_master(START)?;
    // The old master comes back with a stale view (scenario 12): queries may fail until the
    // group settles; they must come back.
    wait_for("a full count after the old master resumed", START, || {
        count(&c, m, "frozen", "gen")
    })?;
    println!(
        "full counts again {:?} after the old master resumed",
        resumed.elapsed()
    );
    // The leaves never stopped heartbeating to the new master: none may be judged lost now.
    // Before, the old master, waking with heartbeat clocks from before its freeze, judged
    // every leaf silent, and its write, forwarded once it learned of the new master, was
    // committed: a live leaf went offline and queries failed until its next heartbeat.
    let watch_until = resumed + Duration::from_secs(4);
    while std::time::Instant::now() < watch_until {
        if let Ok(states) = c.leaf_states(m) {
            let offline: Vec<_> = states.iter().filter(|(_, s)| s != "online").collect();
            assert!(
                offline.is_empty(),
                "leaves went offline after the old master resumed: {offline:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        judged_lost(&c),
        lost_before,
        "the resumed old master judged leaves by heartbeat clocks from before its freeze"
    );
    c.sql(m, "USE frozen; STOP PIPELINE gen")?;
    let rows = c
        .sql(m, "SELECT COUNT(*), COUNT(DISTINCT record) FROM frozen.gen")?
        .rows;
    assert_eq!(rows[0][0], rows[0][1], "no record twice");
    Ok(())
}

/// Scenario 9: the master applies a forwarded CREATE DATABASE and dies before it answers. The
/// follower proposes it again at the new master under the same request id and the client
/// hears the first outcome: OK. Before, the retry ran again and answered "database exists"
/// for a statement that had taken effect.
#[test]
fn a_write_retried_after_its_master_died_gets_its_first_outcome() -> Result<()> {
    let flags = tempfile::tempdir()?;
    let flag = flags.path().join("fired");
    let mut c = Cluster::start(ClusterSpec {
        aggregator_env: vec![(
            "SHARDLINE_TEST_EXIT_AFTER_FORWARDED_CREATE_DATABASE".into(),
            flag.to_string_lossy().into(),
        )],
        ..Default::default()
    })?;
    let m = c.wait_for_master(START)?;
    c.wait_for_leaves_online(m, 2, START)?;
    let follower = (m + 1) % c.aggregators.len();
    let created = c.sql(follower, "CREATE DATABASE idem");
    assert!(flag.exists(), "the master applied the write and exited");
    assert!(!c.aggregators[m].is_running(), "the old master is gone");
    created.inspect_err(|_| c.failed())?;
    let m = c.wait_for_master(START)?;
    let dbs = c.sql(m, "SHOW DATABASES")?.rows;
    assert_eq!(dbs.iter().filter(|r| r[0] == "idem").count(), 1, "{dbs:?}");
    Ok(())
}

/// Scenario 11: a query in flight when a leaf stops answering (frozen, as when it is cut off)
/// fails within a few seconds with an error naming the leaf. Before, it hung for the scan's
/// 60 s timeout.
#[test]
fn a_query_to_a_leaf_that_stops_answering_fails_fast() -> Result<()> {
    let (mut c, m) = ready_cluster(
        ClusterSpec {
            aggregators: 1,
            ..Default::default()
        },
        "cut",
    )?;
    create_datagen(&c, m, "cut", 100)?;
    c.sql(m, "USE cut; START PIPELINE gen FOREGROUND")?;
    assert_eq!(count(&c, m, "cut", "gen"), Some(200));
    let pid = c.leaves[1].pid().expect("leaf pid");
    crate::harness::signal(pid, "STOP")?;
    let asked = std::time::Instant::now();
    let answer = c.sql(m, "SELECT COUNT(*) FROM cut.gen");
    let took = asked.elapsed();
    crate::harness::signal(pid, "CONT")?;
    println!("a query to a frozen leaf answered after {took:?}: {answer:?}");
    let err = answer.expect_err("a frozen leaf cannot answer");
    let leaf = c.leaves[1].arg("--listen").unwrap_or_default().to_string();
    assert!(
        err.to_string().contains(&leaf),
        "the error names the leaf: {err}"
    );
    assert!(
        took < Duration::from_secs(10),
        "the query failed after {took:?}: past the documented bound (about 5 s)"
    );
    c.leaves[1].kill();
    Ok(())
}

/// Scenario 12: an aggregator that cannot reach a master (here its two peers are frozen, as if
/// it were cut off) says so instead of answering from the view it was left with; SHOW
/// AGGREGATORS still shows its own view, and once the group is back it answers again. Before,
/// it answered every query from its last catalog.
#[test]
fn an_aggregator_cut_off_from_the_master_says_so_instead_of_answering_stale() -> Result<()> {
    let (c, m) = ready_cluster(ClusterSpec::default(), "stale")?;
    create_datagen(&c, m, "stale", 100)?;
    c.sql(m, "USE stale; START PIPELINE gen FOREGROUND")?;
    let alone = (m + 1) % 3;
    let frozen: Vec<u32> = (0..3)
        .filter(|i| *i != alone)
        .filter_map(|i| c.aggregators[i].pid())
        .collect();
    for pid in &frozen {
        crate::harness::signal(*pid, "STOP")?;
    }
    let asked = std::time::Instant::now();
    let answer = c.sql(alone, "SELECT COUNT(*) FROM stale.gen");
    let took = asked.elapsed();
    let diagnosis = c.sql(alone, "SHOW AGGREGATORS");
    for pid in &frozen {
        crate::harness::signal(*pid, "CONT")?;
    }
    println!("an aggregator alone answered after {took:?}: {answer:?}");
    let err = answer.expect_err("no master confirms this aggregator's view");
    assert!(
        err.to_string().contains("not in contact with a master"),
        "{err}"
    );
    assert!(diagnosis.is_ok(), "SHOW AGGREGATORS answers: {diagnosis:?}");
    wait_for("answers again", START, || count(&c, alone, "stale", "gen"))
        .map(|n| assert_eq!(n, 200))?;
    Ok(())
}

/// The epoch the last "starting task" line of a leaf's log names for task 0 of pipeline `id`.
fn started_epoch(c: &Cluster, leaf: usize, pipeline_id: u64) -> Option<u64> {
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
    };
    c.leaves[leaf]
        .log_text()
        .lines()
        .filter(|l| l.contains("starting task") && l.contains(" task=0"))
        .filter(|l| field(l, "pipeline_id=") == Some(pipeline_id))
        .filter_map(|l| field(l, "epoch="))
        .next_back()
}

/// Scenario 13: a task's earlier run (on a leaf that was cut off, or before a move) reports an
/// error after the task has moved to another leaf under a new epoch. It is recorded as that old
/// run's, a Warning that says so, and the pipeline is untouched; an error of the current run is
/// still an Error. Before, the old run's error landed as an Error of the pipeline.
#[test]
fn an_error_from_a_task_that_has_moved_is_recorded_as_the_old_runs() -> Result<()> {
    let (mut c, m) = ready_cluster(
        ClusterSpec {
            aggregators: 1,
            ..Default::default()
        },
        "moved",
    )?;
    c.sql(
        m,
        "USE moved; CREATE INFERRED PIPELINE gen AS LOAD DATA KAFKACONNECT 'datagen' CONFIG '{\"connector.class\":\"io.shardline.connect.datagen.DatagenSourceConnector\",\"datagen.rate\":20,\"datagen.records\":1000000,\"tasks.max\":1}' FORMAT AVRO",
    )?;
    c.sql(m, "USE moved; START PIPELINE gen")?;
    let pipeline_id: u64 = c
        .sql(
            m,
            "SELECT PIPELINE_ID FROM information_schema.PIPELINES WHERE PIPELINE_NAME = 'gen'",
        )?
        .rows[0][0]
        .parse()?;
    let (first, old_epoch) = wait_for("the task to start", START, || {
        (0..2).find_map(|i| started_epoch(&c, i, pipeline_id).map(|e| (i, e)))
    })?;
    c.leaves[first].kill();
    let new_epoch = wait_for("the task to move", START, || {
        started_epoch(&c, 1 - first, pipeline_id).filter(|e| *e > old_epoch)
    })?;
    let addr = c.aggregators[m]
        .arg("--grpc-listen")
        .unwrap_or_default()
        .to_string();
    let report = |epoch: u64, message: &str, fatal: bool| -> Result<()> {
        let addr = addr.clone();
        let request = proto::TaskErrorRequest {
            pipeline_id,
            task_id: 0,
            epoch,
            message: message.into(),
            fatal,
            host: "127.0.0.1".into(),
            port: 1,
            partition: String::new(),
        };
        runtime().block_on(async move {
            let mut client =
                proto::aggregator_client::AggregatorClient::connect(format!("http://{addr}"))
                    .await?;
            client.report_task_error(request).await?;
            anyhow::Ok(())
        })
    };
    report(old_epoch, "late failure of the old run", true)?;
    report(new_epoch, "failure of the current run", false)?;
    let errors = c
        .sql(
            m,
            "SELECT ERROR_TYPE, ERROR_MESSAGE FROM information_schema.PIPELINES_ERRORS WHERE PIPELINE_NAME = 'gen'",
        )?
        .rows;
    let find = |text: &str| errors.iter().find(|r| r[1].contains(text)).cloned();
    let old = find("late failure").expect("the old run's error is recorded");
    assert_eq!(old[0], "Warning", "{old:?}");
    assert!(
        old[1].contains(&format!("earlier run of task 0 (epoch {old_epoch})")),
        "{old:?}"
    );
    let current = find("current run").expect("the current run's error is recorded");
    assert_eq!(current[0], "Error", "{current:?}");
    let state = c
        .sql(
            m,
            "SELECT STATE FROM information_schema.PIPELINES WHERE PIPELINE_NAME = 'gen'",
        )?
        .rows[0][0]
        .clone();
    assert_eq!(
        state, "Running",
        "a late error of an old run must not stop the pipeline"
    );
    Ok(())
}
