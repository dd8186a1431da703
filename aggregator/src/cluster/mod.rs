//! Cluster membership seen from the aggregators: leaf liveness (on the master) and probes of
//! other aggregators.

pub mod batches;
pub mod leaf_client;
mod leaves;
pub mod scheduler;

pub use leaves::LeafMonitor;

use std::time::{Duration, Instant};

/// What a live aggregator says about itself.
pub struct Probe {
    pub open_connections: i64,
    pub round_trip_ms: f64,
    pub mysql_address: String,
}

/// Asks another aggregator for its status, or `None` if it did not answer within a short
/// deadline.
pub async fn probe_aggregator(grpc_address: &str) -> Option<Probe> {
    let start = Instant::now();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{grpc_address}"))
        .ok()?
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_millis(500));
    let call = async {
        let channel = endpoint.connect().await.ok()?;
        let mut client = proto::aggregator_client::AggregatorClient::new(channel);
        client
            .status(proto::StatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    };
    let status = tokio::time::timeout(Duration::from_millis(800), call)
        .await
        .ok()??;
    Some(Probe {
        open_connections: status.open_connections as i64,
        round_trip_ms: start.elapsed().as_secs_f64() * 1000.0,
        mysql_address: status.mysql_address,
    })
}
