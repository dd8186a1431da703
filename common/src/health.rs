//! The standard gRPC health service (`grpc.health.v1.Health`) on every node's gRPC port, for
//! Docker health checks (`shardline-health`) and Kubernetes gRPC probes.
//!
//! Service `""` answers SERVING while the node serves gRPC at all (liveness: restart only a
//! process that stopped answering). Service [`READY_SERVICE`] answers SERVING while the node can
//! do its work (readiness): an aggregator that knows the master, a leaf that reaches it.

use std::future::Future;
use std::time::Duration;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::ServingStatus;

/// The health service name that reports readiness.
pub const READY_SERVICE: &str = "shardline.ready";

/// How often readiness is re-evaluated.
const POLL: Duration = Duration::from_millis(500);

/// The health service to add to a node's gRPC server. A background task re-evaluates `ready`
/// every 500 ms until `shutdown` completes.
pub fn service(
    ready: impl Fn() -> bool + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> HealthServer<impl Health> {
    let (reporter, server) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        loop {
            let status = if ready() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status(READY_SERVICE, status).await;
            tokio::select! {
                _ = &mut shutdown => {
                    reporter.set_service_status("", ServingStatus::NotServing).await;
                    return;
                }
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    });
    server
}
