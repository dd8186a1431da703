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

/// The client a query's calls to a leaf share: one HTTP/2 connection per leaf address, kept
/// between queries (a connection per query would cost a handshake each), pinged every
/// [`KEEPALIVE_INTERVAL`] so a query of a leaf that stops answering fails in a few seconds
/// ([`KEEPALIVE_TIMEOUT`]) however long its scan runs where the leaf answers.
pub fn query_client(address: &str) -> Result<LeafClient<Channel>, String> {
    static CLIENTS: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, LeafClient<Channel>>>,
    > = std::sync::OnceLock::new();
    let clients = CLIENTS.get_or_init(Default::default);
    let mut clients = clients.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = clients.get(address) {
        return Ok(c.clone());
    }
    let c = with_endpoint(address, |e| {
        e.http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
    })?;
    clients.insert(address.to_string(), c.clone());
    Ok(c)
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
