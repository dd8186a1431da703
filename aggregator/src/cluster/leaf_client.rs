//! Calls from the aggregator to leaves: task planning, scans, TEST PIPELINE.

use common::catalog::Catalog;
use proto::leaf_client::LeafClient;
use std::time::Duration;
use tonic::transport::Channel;

/// How often a scan's connection to a leaf is checked with an HTTP/2 ping.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered before the connection counts as dead. With
/// [`KEEPALIVE_INTERVAL`] this bounds how long a scan of a leaf that is cut off or frozen hangs
/// (about 5 s), however long the scan itself takes on a leaf that answers. Not shorter: a
/// leaf busy on a loaded machine must not look dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(4);

/// A client for one leaf (lazy connection, `timeout` for the whole call).
pub fn client(address: &str, timeout: Duration) -> Result<LeafClient<Channel>, String> {
    with_endpoint(address, |e| e.timeout(timeout))
}

/// A client for scans: `timeout` for the whole call, and a few seconds for a leaf that stops
/// answering ([`KEEPALIVE_TIMEOUT`]), so a query fails fast instead of hanging on it.
pub fn scan_client(address: &str, timeout: Duration) -> Result<LeafClient<Channel>, String> {
    with_endpoint(address, |e| {
        e.timeout(timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
    })
}

fn with_endpoint(
    address: &str,
    configure: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
) -> Result<LeafClient<Channel>, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("bad leaf address {address}: {e}"))?
        .connect_timeout(Duration::from_millis(500));
    let endpoint = configure(endpoint);
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
