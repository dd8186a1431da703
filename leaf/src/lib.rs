//! The Shardline leaf.
//!
//! - [`config`]: `LeafConfig` (flags, env, defaults, validation);
//! - [`client`]: the client that finds and follows the master aggregator;
//! - [`membership`]: registration and heartbeats;
//! - [`grpc`]: the leaf's gRPC service (status, task planning, scans, TEST PIPELINE);
//! - [`store`]: the sled partition store with prepared and committed batches;
//! - [`tasks`]: connector tasks and their batch loop.

pub mod client;
pub mod config;
pub mod grpc;
pub mod membership;
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
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create data directory {}: {e}",
            config.data_dir.display()
        )
    })?;
    let store = store::Store::open(&config.data_dir.join("store")).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the partition store in {}: {e}",
            config.data_dir.display()
        )
    })?;
    let tasks = TaskTracker::new();
    let state = Arc::new(membership::Membership::default());
    let manager = Arc::new(tasks::TaskManager::new(
        store.clone(),
        config.aggregator_addresses(),
        config.advertise_address(),
        tasks.clone(),
        shutdown.clone(),
    ));
    let service = grpc::LeafServiceImpl {
        membership: state.clone(),
        store: store.clone(),
    };
    let grpc_shutdown = shutdown.clone();
    tasks.spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(proto::leaf_server::LeafServer::new(service))
            .serve_with_incoming_shutdown(incoming, grpc_shutdown.cancelled())
            .await
        {
            tracing::error!("gRPC server failed: {e}");
            grpc_shutdown.cancel();
        }
    });
    tasks.spawn(membership::heartbeat_loop(
        config.clone(),
        state,
        manager,
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
