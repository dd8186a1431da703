//! The Shardline leaf.
//!
//! - [`config`]: `LeafConfig` (flags, env, defaults, validation);
//! - [`batch`]: one batch's load, prepare, commit and finalize;
//! - [`client`]: the client that finds and follows the master aggregator;
//! - [`commits`]: the leaf's batch commits at the master, sent together;
//! - [`finalized`]: confirmations to the master of the committed batches made visible;
//! - [`membership`]: registration and heartbeats;
//! - [`offsets`]: the committed offsets the leaf holds, kept up to date by heartbeat deltas;
//! - [`grpc`]: the leaf's gRPC service (status, task planning, queries, TEST PIPELINE);
//! - [`query`]: the leaf's part of queries: plan fragments run over the store, streamed back;
//! - [`store`]: the sled partition store with prepared and committed batches;
//! - [`tasks`]: connector tasks and their batch loop.

pub mod batch;
pub mod client;
pub mod commits;
pub mod config;
pub mod finalized;
pub mod grpc;
pub mod membership;
pub mod offsets;
pub mod query;
pub mod store;
pub mod tasks;

pub use config::LeafConfig;

use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Runs a leaf on an already-bound listener until `shutdown` is cancelled.
pub async fn run(
    config: LeafConfig,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    common::datadir::prepare(&config.data_dir, config.require_volume)
        .map_err(anyhow::Error::msg)?;
    let store = store::Store::open_with_cache(
        &config.data_dir.join("store"),
        Some(config.store_cache_mb.max(1) * 1024 * 1024),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "cannot open the partition store in {}: {e}",
            config.data_dir.display()
        )
    })?;
    let tasks = TaskTracker::new();
    let state = Arc::new(membership::Membership::default());
    let metrics = Arc::new(common::metrics::Metrics::default());
    metrics.describe(
        "shardline_rows_loaded_total",
        "Rows this leaf loaded in committed batches.",
    );
    metrics.describe(
        "shardline_bytes_loaded_total",
        "Source bytes this leaf loaded in committed batches.",
    );
    metrics.describe(
        "shardline_batches_committed_total",
        "Batches this leaf committed.",
    );
    metrics.describe(
        "shardline_batches_failed_total",
        "Batches refused or failed on this leaf.",
    );
    metrics.describe(
        "shardline_commit_seconds_sum",
        "Time from a batch's prepare to its commit.",
    );
    metrics.describe(
        "shardline_heartbeat_response_bytes",
        "Size of the last heartbeat answer from the master (assignments, offsets changes).",
    );
    metrics.describe(
        "shardline_source_lag_millis",
        "How far behind the newest record of the source each read partition is (Kinesis MillisBehindLatest per shard).",
    );
    query::describe_metrics(&metrics);
    store.set_metrics(metrics.clone());
    if let Some(listener) = metrics_listener {
        let m = metrics.clone();
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || m.render());
        let stop = shutdown.clone();
        tasks.spawn(common::metrics::serve(listener, render, async move {
            stop.cancelled().await
        }));
    }
    // Every client of the master calls the group as the master last described it.
    let aggregators = client::AggregatorList::remembered(
        config.data_dir.join("aggregators.json"),
        config.aggregator_addresses(),
    );
    let manager = Arc::new(tasks::TaskManager::new(
        store.clone(),
        aggregators.clone(),
        config.advertise_address(),
        tasks.clone(),
        shutdown.clone(),
        metrics.clone(),
    ));
    let service = grpc::LeafServiceImpl {
        membership: state.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
    };
    let grpc_shutdown = shutdown.clone();
    let ready_state = state.clone();
    let health = common::health::service(
        move || ready_state.reaches_master(),
        shutdown.clone().cancelled_owned(),
    );
    tasks.spawn(async move {
        let incoming = common::net::nodelay_incoming(listener);
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(proto::leaf_server::LeafServer::new(service))
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, grpc_shutdown.cancelled())
            .await
        {
            tracing::error!("gRPC server failed: {e}");
            grpc_shutdown.cancel();
        }
    });
    tasks.spawn(flush_loop(
        store.clone(),
        config.segment_rows,
        std::time::Duration::from_millis(config.flush_interval_ms.max(10)),
        shutdown.clone(),
    ));
    tasks.spawn(finalized::confirm_finalized_loop(
        store.clone(),
        client::MasterClient::new(aggregators.clone()),
        shutdown.clone(),
    ));
    tasks.spawn(membership::heartbeat_loop(
        config.clone(),
        aggregators,
        state,
        manager,
        store.clone(),
        shutdown.clone(),
    ));
    tracing::info!(listen = %config.listen, advertise = %config.advertise_address(), "leaf started");
    shutdown.cancelled().await;
    tasks.close();
    tasks.wait().await;
    store.flush().await?;
    tracing::info!("leaf stopped");
    Ok(())
}

/// Moves committed rows into column segments as partitions fill up (blocking work, off the
/// runtime's workers); a failed flush is logged and tried again (the rows stay where they
/// are, readable).
async fn flush_loop(
    store: store::Store,
    min_rows: usize,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.flush_segments(min_rows)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("flushing column segments failed (will retry): {e}"),
            Err(e) => tracing::warn!("flushing column segments stopped: {e}"),
        }
    }
}
