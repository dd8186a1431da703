//! Cluster membership seen from the aggregators: leaf liveness (on the master) and probes of
//! other aggregators.

mod leaves;

pub use leaves::LeafMonitor;

use std::time::{Duration, Instant};

/// Asks another aggregator for its status. Returns its open MySQL connections and the round
/// trip in milliseconds, or `None` if it did not answer within a short deadline.
pub async fn probe_aggregator(grpc_address: &str) -> Option<(i64, f64)> {
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
    Some((
        status.open_connections as i64,
        start.elapsed().as_secs_f64() * 1000.0,
    ))
}
