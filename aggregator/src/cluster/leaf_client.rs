//! Calls from the aggregator to leaves: task planning, scans, TEST PIPELINE.

use common::catalog::Catalog;
use proto::leaf_client::LeafClient;
use std::time::Duration;
use tonic::transport::Channel;

/// A client for one leaf (lazy connection, bounded timeouts).
pub fn client(address: &str, timeout: Duration) -> Result<LeafClient<Channel>, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("bad leaf address {address}: {e}"))?
        .connect_timeout(Duration::from_millis(500))
        .timeout(timeout);
    Ok(LeafClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(proto::MAX_MESSAGE_BYTES))
}

/// Addresses of online leaves, preferring those that hold partitions of `database`.
pub fn online_leaves(catalog: &Catalog, database: Option<&str>) -> Vec<String> {
    let holders: Vec<_> = database
        .and_then(|d| catalog.databases.get(d))
        .map(|d| d.leaves())
        .unwrap_or_default();
    let mut leaves: Vec<_> = catalog.leaves.values().filter(|l| l.online).collect();
    leaves.sort_by_key(|l| (!holders.contains(&l.id), l.id));
    leaves.into_iter().map(|l| l.address.clone()).collect()
}
