//! Bad input: SQL errors with MySQL codes, wrong passwords, start-up configuration errors.

use crate::harness::{free_port, mysql, Cluster, ClusterSpec};
use anyhow::Result;
use std::process::Command;
use std::time::Duration;

fn expect_error(c: &Cluster, sql: &str, code: &str, words: &str) {
    let err = c.sql(0, sql).expect_err(sql).to_string();
    assert!(err.contains(&format!("ERROR {code}")), "{sql}: {err}");
    assert!(
        err.to_lowercase().contains(&words.to_lowercase()),
        "{sql}: {err}"
    );
}

#[test]
fn sql_errors_have_codes_and_the_node_keeps_serving() -> Result<()> {
    let mut c = Cluster::start(ClusterSpec {
        aggregators: 1,
        leaves: 1,
        ..Default::default()
    })?;
    c.wait_for_master(Duration::from_secs(30))?;
    c.wait_for_leaves_online(0, 1, Duration::from_secs(30))?;
    expect_error(&c, "SELEC 1", "1064", "syntax");
    expect_error(&c, "CREATE DATABASE", "1064", "syntax");
    expect_error(&c, "FLUSH TABLES", "1235", "support");
    expect_error(
        &c,
        "SET GLOBAL no_such_variable = 1",
        "1193",
        "Unknown system variable",
    );
    expect_error(
        &c,
        "SELECT @@no_such_variable",
        "1193",
        "Unknown system variable",
    );
    expect_error(
        &c,
        "SET GLOBAL pipelines_batch_interval = 'soon'",
        "1231",
        "integer",
    );
    expect_error(
        &c,
        "SET GLOBAL experimental_features_config = 'warp=true'",
        "1231",
        "unknown feature",
    );
    expect_error(&c, "SET GLOBAL version = '1'", "1238", "read only");
    expect_error(&c, "SET pipelines_batch_interval = 5", "1229", "SET GLOBAL");
    expect_error(&c, "USE nowhere", "1049", "Unknown database");
    expect_error(&c, "DROP DATABASE nowhere", "1008", "doesn't exist");
    expect_error(&c, "SHOW PARTITIONS ON nowhere", "1049", "Unknown database");
    expect_error(
        &c,
        "CREATE DATABASE big PARTITIONS 100000",
        "1210",
        "partition",
    );
    c.sql(0, "CREATE DATABASE twice")?;
    expect_error(&c, "CREATE DATABASE twice", "1007", "exists");
    c.sql(0, "CREATE DATABASE IF NOT EXISTS twice")?;
    c.sql(0, "DROP DATABASE IF EXISTS nowhere")?;
    expect_error(&c, "DROP DATABASE information_schema", "1045", "denied");
    assert_eq!(c.sql(0, "SELECT 1")?.rows, vec![vec!["1".to_string()]]);
    assert!(c.aggregators[0].is_running());
    Ok(())
}

#[test]
fn a_wrong_password_is_refused() -> Result<()> {
    let mut c = Cluster::start(ClusterSpec {
        aggregators: 1,
        leaves: 0,
        password: "s3cret!".into(),
        ..Default::default()
    })?;
    c.wait_for_master(Duration::from_secs(30))?;
    let port = c.mysql_ports[0];
    let err = mysql(port, "wrong", "SELECT 1")
        .expect_err("wrong password")
        .to_string();
    assert!(
        err.contains("ERROR 1698") || err.contains("ERROR 1045"),
        "{err}"
    );
    let err = mysql(port, "", "SELECT 1")
        .expect_err("no password")
        .to_string();
    assert!(err.contains("ERROR"), "{err}");
    assert_eq!(
        mysql(port, "s3cret!", "SELECT 1")?.rows,
        vec![vec!["1".to_string()]]
    );
    // The password never shows in the process's logs.
    assert!(!c.aggregators[0].log_text().contains("s3cret!"));
    Ok(())
}

fn run_aggregator(args: &[&str]) -> (bool, String) {
    let out = Command::new(crate::harness::bin_dir().join("aggregator"))
        .args(args)
        .output()
        .expect("run aggregator");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn start_up_configuration_errors_exit_with_one_clear_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().to_string_lossy().to_string();
    let grpc = format!("127.0.0.1:{}", free_port());
    let mysql_addr = format!("127.0.0.1:{}", free_port());
    let base = [
        "--grpc-listen",
        &grpc,
        "--mysql-listen",
        &mysql_addr,
        "--data-dir",
        &data,
    ];

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--node-id", "4", "--peers", "1=127.0.0.1:1,2=127.0.0.1:2"],
            "not in --peers",
        ),
        (
            vec!["--node-id", "1", "--peers", "1=127.0.0.1"],
            "HOST:PORT",
        ),
        (vec!["--node-id", "1", "--peers", "1=a:1,1=b:2"], "twice"),
        // The peers would look for this node elsewhere than where it listens.
        (
            vec!["--node-id", "1", "--peers", "1=127.0.0.1:1,2=127.0.0.1:2"],
            "gives node 1 the address 127.0.0.1:1",
        ),
        // A data directory that is not a volume when one is required (as in the image).
        (vec!["--require-volume"], "is not a mounted volume"),
    ];
    for (extra, words) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra);
        let (ok, err) = run_aggregator(&args);
        assert!(!ok, "{args:?} should fail");
        assert_eq!(err.lines().count(), 1, "one line, got: {err}");
        assert!(err.contains(words), "{err}");
    }

    // Port in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken_addr = taken.local_addr()?.to_string();
    let (ok, err) = run_aggregator(&[
        "--grpc-listen",
        &taken_addr,
        "--mysql-listen",
        &mysql_addr,
        "--data-dir",
        &data,
    ]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot listen") && err.contains(&taken_addr),
        "{err}"
    );

    // Unwritable data directory (a regular file stands where the directory should be).
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x")?;
    let bad = file.join("sub").to_string_lossy().to_string();
    let (ok, err) = run_aggregator(&[
        "--grpc-listen",
        &grpc,
        "--mysql-listen",
        &mysql_addr,
        "--data-dir",
        &bad,
    ]);
    assert!(!ok);
    assert_eq!(
        err.lines().filter(|l| l.contains("aggregator:")).count(),
        1,
        "{err}"
    );
    assert!(err.contains("data directory"), "{err}");

    // The leaf, too.
    let out = Command::new(crate::harness::bin_dir().join("leaf"))
        .args(["--aggregators", "", "--data-dir", &data])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--aggregators"));
    let out = Command::new(crate::harness::bin_dir().join("leaf"))
        .args(["--data-dir", &data, "--listen", &grpc])
        .env("SHARDLINE_REQUIRE_VOLUME", "true")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines().filter(|l| l.starts_with("leaf:")).count() == 1
            && err.contains("is not a mounted volume"),
        "{err}"
    );
    Ok(())
}

/// `CommitBatches` answers every batch on its own: a batch the master cannot read is `Invalid`,
/// one for an unknown pipeline is `Refused`, neither fails the call; a follower sends the
/// caller to the master. (Batches that commit go through this call in every pipeline test.)
#[test]
fn commit_batches_answers_each_batch_on_its_own() -> Result<()> {
    let mut c = Cluster::start(ClusterSpec {
        aggregators: 3,
        leaves: 0,
        ..Default::default()
    })?;
    let master = c.wait_for_master(Duration::from_secs(30))?;
    let follower = (master + 1) % 3;
    let grpc = |i: usize| c.aggregators[i].arg("--grpc-listen").unwrap().to_string();
    let (master_addr, follower_addr) = (grpc(master), grpc(follower));
    let batch = proto::BatchCommit {
        pipeline_id: 999_999,
        task_id: 0,
        epoch: 1,
        seq: 1,
        rows: 1,
        bytes: 1,
        num_partitions: 1,
        ..Default::default()
    };
    // An offset that is not JSON, and a batch of a pipeline that does not exist.
    let garbled = proto::BatchCommit {
        offsets: vec![proto::OffsetUpdate {
            key: "shard".into(),
            to_json: "{not json".into(),
            ..Default::default()
        }],
        ..batch.clone()
    };
    let request = proto::CommitBatchesRequest {
        batches: vec![garbled, batch],
    };
    tokio::runtime::Runtime::new()?.block_on(async {
        let connect = |addr: String| async move {
            proto::aggregator_client::AggregatorClient::connect(format!("http://{addr}")).await
        };
        let status = connect(follower_addr)
            .await?
            .commit_batches(request.clone())
            .await
            .expect_err("a follower must not commit");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        let hint = status.metadata().get(proto::LEADER_HINT_METADATA);
        assert_eq!(
            hint.and_then(|h| h.to_str().ok()),
            Some(master_addr.as_str()),
            "{status:?}"
        );

        let mut m = connect(master_addr).await?;
        let outcomes = m.commit_batches(request).await?.into_inner().outcomes;
        assert_eq!(outcomes.len(), 2, "{outcomes:?}");
        assert_eq!(outcomes[0].status(), proto::BatchStatus::Invalid);
        assert!(outcomes[0].reason.contains("bad batch"), "{outcomes:?}");
        assert_eq!(outcomes[1].status(), proto::BatchStatus::Refused);
        assert!(!outcomes[1].reason.is_empty(), "{outcomes:?}");
        let empty = proto::CommitBatchesRequest { batches: vec![] };
        assert!(m
            .commit_batches(empty)
            .await?
            .into_inner()
            .outcomes
            .is_empty());
        anyhow::Ok(())
    })
}
