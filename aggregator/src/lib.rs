//! The Shardline aggregator.
//!
//! - [`config`]: `AggregatorConfig` (flags, env, defaults, validation);
//! - [`raft`]: the Raft group that replicates the catalog (raft-rs, sled);
//! - [`cluster`]: leaf liveness on the master, probes of other aggregators;
//! - [`sql`]: parsing and executing statements;
//! - [`mysql`]: the MySQL wire protocol front door;
//! - [`grpc`]: the gRPC service for aggregators and leaves;
//! - [`identity`]: the node's identity in its data directory, and how a new one joins;
//! - [`error`]: the crate's error type.

pub mod cluster;
pub mod config;
pub mod error;
pub mod grpc;
pub mod identity;
pub mod mysql;
pub mod raft;
pub mod sql;

pub use config::AggregatorConfig;
pub use error::{Error, Result};

use common::catalog::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Runs an aggregator on already-bound listeners until `shutdown` is cancelled (or the Raft
/// store fails). Every task it spawns is awaited before it returns.
pub async fn run(
    config: AggregatorConfig,
    grpc_listener: TcpListener,
    mysql_listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    common::datadir::prepare(&config.data_dir, config.require_volume)
        .map_err(anyhow::Error::msg)?;
    let tasks = TaskTracker::new();
    let (raft, launcher) = raft::RaftHandle::new(&config)?;
    let engine = Arc::new(sql::SqlEngine::new(
        raft.clone(),
        config.mysql_address(),
        config.leaf_heartbeat_timeout(),
    ));
    let leaves = Arc::new(cluster::LeafMonitor::new(
        raft.clone(),
        config.leaf_heartbeat_timeout(),
    ));

    let metrics = Arc::new(common::metrics::Metrics::default());
    metrics.describe(
        "shardline_batches_committed_total",
        "Batches committed through Raft by this master.",
    );
    metrics.describe(
        "shardline_task_assignments_total",
        "Tasks (re)assigned to leaves by this master.",
    );
    metrics.describe("shardline_raft_term", "Current Raft term.");
    metrics.describe(
        "shardline_raft_snapshot_bytes",
        "Size of the last catalog snapshot this aggregator took.",
    );
    metrics.describe(
        "shardline_raft_snapshot_encode_seconds",
        "How long encoding the last catalog snapshot took (off the Raft driver).",
    );
    metrics.describe(
        "shardline_raft_is_leader",
        "1 while this aggregator is the master.",
    );
    metrics.describe(
        "shardline_select_plans_reused_total",
        "SELECTs whose optimized plan was bound from one kept for their shape (the statement without its literals).",
    );
    metrics.describe(
        "shardline_select_physical_plans_reused_total",
        "Of the reused: SELECTs that ran a physical plan kept for their shape, their values bound in the leaves' fragments (no planning at all).",
    );
    metrics.describe(
        "shardline_select_plans_built_total",
        "SELECTs planned and optimized in full.",
    );
    if let Some(listener) = metrics_listener {
        let m = metrics.clone();
        let e = engine.clone();
        let r = raft.clone();
        let c = engine.connections.clone();
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
            let st = r.status();
            m.set("shardline_raft_term", st.term as f64);
            m.set(
                "shardline_raft_is_leader",
                f64::from(u8::from(st.is_leader())),
            );
            m.set(
                "shardline_raft_leader_node",
                st.leader.map_or(0.0, |l| l.0 as f64),
            );
            m.set("shardline_raft_applied_index", st.applied as f64);
            m.set("shardline_raft_snapshot_bytes", st.snapshot_bytes as f64);
            m.set(
                "shardline_raft_snapshot_encode_seconds",
                st.snapshot_encode_ms as f64 / 1000.0,
            );
            let (reused, built, physical) = e.plan_counts();
            m.set("shardline_select_plans_reused_total", reused as f64);
            m.set("shardline_select_plans_built_total", built as f64);
            m.set(
                "shardline_select_physical_plans_reused_total",
                physical as f64,
            );
            m.set(
                "shardline_mysql_connections",
                c.load(std::sync::atomic::Ordering::Relaxed) as f64,
            );
            m.render()
        });
        let stop = shutdown.clone();
        tasks.spawn(common::metrics::serve(listener, render, async move {
            stop.cancelled().await
        }));
    }
    let service = grpc::AggregatorServiceImpl {
        raft: raft.clone(),
        leaves: leaves.clone(),
        connections: engine.connections.clone(),
        mysql_address: config.mysql_address(),
        metrics: metrics.clone(),
    };
    let grpc_shutdown = shutdown.clone();
    let ready_raft = raft.clone();
    let health = common::health::service(
        move || ready_raft.status().leader.is_some(),
        shutdown.clone().cancelled_owned(),
    );
    tasks.spawn(async move {
        let server = proto::aggregator_server::AggregatorServer::new(service)
            .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(proto::MAX_MESSAGE_BYTES);
        let incoming = common::net::nodelay_incoming(grpc_listener);
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(server)
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, grpc_shutdown.cancelled())
            .await
        {
            tracing::error!("gRPC server failed: {e}");
            grpc_shutdown.cancel();
        }
    });

    tasks.spawn(mysql::serve(
        mysql_listener,
        engine.clone(),
        Arc::new(config.root_password.clone()),
        tasks.clone(),
        shutdown.clone(),
    ));

    let monitor_shutdown = shutdown.clone();
    tasks.spawn(async move { leaves.run(monitor_shutdown).await });

    tasks.spawn(cluster::scheduler::run(
        raft.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    tasks.spawn(announce_mysql_address(
        raft.clone(),
        config.mysql_address(),
        shutdown.clone(),
    ));

    // Everything above serves already (other nodes' identity questions among it); Raft starts
    // once this node knows how it may take part.
    let launched = match identity::decide(&config, &shutdown).await {
        Ok(membership) => raft
            .launch(launcher, membership, &config, &tasks, shutdown.clone())
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot open the raft store in {}: {e}",
                    config.data_dir.display()
                )
            }),
        Err(e) => Err(anyhow::anyhow!(
            "aggregator {} refuses to start: {e}",
            config.node_id
        )),
    };
    if let Err(e) = launched {
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
        return Err(e);
    }
    tasks.spawn(keep_cluster_identity(
        raft.clone(),
        config.clone(),
        shutdown.clone(),
    ));
    tracing::info!(
        node = config.node_id,
        grpc = %config.grpc_listen,
        mysql = %config.mysql_listen,
        "aggregator started"
    );
    shutdown.cancelled().await;
    tasks.close();
    tasks.wait().await;
    if raft.failed() {
        anyhow::bail!("stopped because the raft driver failed (see the log above)");
    }
    tracing::info!("aggregator stopped");
    Ok(())
}

/// Records this aggregator's MySQL address in the catalog (for SHOW AGGREGATORS) once a
/// master exists, and again whenever it is missing or different.
async fn announce_mysql_address(
    raft: raft::RaftHandle,
    address: String,
    shutdown: CancellationToken,
) {
    let me = raft.node_id();
    loop {
        let mut known = raft.read_catalog(|c| c.aggregators.get(&me) == Some(&address));
        if !known && raft.status().leader.is_some() {
            let cmd = Command::SetAggregatorAddress {
                node: me,
                mysql_address: address.clone(),
            };
            match raft.propose(cmd).await {
                Ok(_) => known = true,
                Err(e) => tracing::debug!("announcing the MySQL address failed, will retry: {e}"),
            }
        }
        let wait = if known { 5000 } else { 300 };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        }
    }
}

/// Gives the cluster its identity (the first master records it, with the members it was created
/// with) and keeps this node's copy in its data directory. A catalog of another cluster than
/// the data directory's stops the node.
async fn keep_cluster_identity(
    raft: raft::RaftHandle,
    config: AggregatorConfig,
    shutdown: CancellationToken,
) {
    loop {
        match raft.read_catalog(|c| c.cluster_id.clone()) {
            Some(cluster_id) => {
                if let Err(e) = identity::record_cluster_id(&config.data_dir, &cluster_id) {
                    tracing::error!("stopping the aggregator: {e}");
                    shutdown.cancel();
                }
                return;
            }
            None if raft.is_leader() => {
                let members = match config.peer_map() {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::error!("cannot record the cluster's members: {e}");
                        return;
                    }
                };
                let cluster_id = format!(
                    "{:016x}{:016x}",
                    rand::random::<u64>(),
                    rand::random::<u64>()
                );
                match raft
                    .propose(Command::InitCluster {
                        cluster_id,
                        members,
                    })
                    .await
                {
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::debug!("recording the cluster's identity failed, will retry: {e}")
                    }
                }
            }
            None => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
