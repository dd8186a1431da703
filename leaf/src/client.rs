//! A client for the master aggregator: starts from any configured aggregator, follows the
//! leader hint on `UNAVAILABLE`, and moves on to the next address when one is unreachable or
//! does not answer in time (a partitioned or frozen master: its calls time out, `CANCELLED`).

use proto::aggregator_client::AggregatorClient;
use std::time::Duration;
use tonic::transport::Channel;

/// The aggregators a leaf calls: `--aggregators` at first, then the members the master names
/// in each heartbeat answer. Clones share one list. With a file, the list survives restarts: a
/// leaf restarted after every aggregator it was started with was replaced still finds the group.
#[derive(Clone, Debug, Default)]
pub struct AggregatorList {
    addresses: std::sync::Arc<std::sync::RwLock<Vec<String>>>,
    file: Option<std::path::PathBuf>,
}

impl AggregatorList {
    pub fn new(addresses: Vec<String>) -> Self {
        Self {
            addresses: std::sync::Arc::new(std::sync::RwLock::new(addresses)),
            file: None,
        }
    }

    /// The members last heard of (kept in `file`), then `configured`.
    pub fn remembered(file: std::path::PathBuf, configured: Vec<String>) -> Self {
        let mut addresses: Vec<String> = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        for a in configured {
            if !addresses.contains(&a) {
                addresses.push(a);
            }
        }
        Self {
            addresses: std::sync::Arc::new(std::sync::RwLock::new(addresses)),
            file: Some(file),
        }
    }

    pub fn get(&self) -> Vec<String> {
        self.addresses
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Follows the group's membership as the master gives it (ignored when empty: a master
    /// from before member lists, or none known).
    pub fn replace(&self, mut addresses: Vec<String>) {
        if addresses.is_empty() {
            return;
        }
        addresses.sort();
        addresses.dedup();
        let mut current = self.addresses.write().unwrap_or_else(|p| p.into_inner());
        if *current == addresses {
            return;
        }
        tracing::info!(aggregators = ?addresses, "the aggregator group changed");
        if let Some(file) = &self.file {
            let tmp = file.with_extension("tmp");
            let written = serde_json::to_vec(&addresses)
                .map_err(std::io::Error::other)
                .and_then(|bytes| std::fs::write(&tmp, bytes))
                .and_then(|()| std::fs::rename(&tmp, file));
            if let Err(e) = written {
                tracing::warn!("cannot remember the aggregators in {}: {e}", file.display());
            }
        }
        *current = addresses;
    }
}

impl From<Vec<String>> for AggregatorList {
    fn from(addresses: Vec<String>) -> Self {
        Self::new(addresses)
    }
}

/// Clones share the connection (a tonic channel) and then follow leader hints on their own.
#[derive(Clone)]
pub struct MasterClient {
    addresses: AggregatorList,
    next: usize,
    current: Option<(String, AggregatorClient<Channel>)>,
    /// How long one call may take before the aggregator counts as unreachable.
    timeout: Duration,
}

/// [`MasterClient::new`]'s call timeout.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a call to the master failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no aggregator reachable: {0}")]
    Unreachable(String),
    #[error("{0}")]
    Rejected(tonic::Status),
}

impl CallError {
    /// The same error again (one failed call fails every batch it carried).
    pub fn duplicate(&self) -> Self {
        match self {
            Self::Unreachable(s) => Self::Unreachable(s.clone()),
            Self::Rejected(status) => {
                Self::Rejected(tonic::Status::new(status.code(), status.message()))
            }
        }
    }
}

/// How often an open connection to an aggregator is checked with an HTTP/2 ping, and how long
/// a ping may go unanswered: an aggregator that is cut off or frozen is left within about a
/// second, whatever the call's own timeout (a commit may legitimately wait on Raft longer).
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(500);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(1000);

fn connect(addr: &str, timeout: Duration) -> Option<AggregatorClient<Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).ok()?;
    Some(AggregatorClient::new(
        endpoint
            .connect_timeout(Duration::from_millis(500))
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .timeout(timeout)
            .connect_lazy(),
    ))
}

/// Whether a failed call says nothing about the request but that this aggregator did not
/// answer it (down, cut off, frozen, a connection that died under it, or not the master): try
/// another one. Every call a leaf makes to the master may be repeated (commits, finalize
/// confirmations and registration are idempotent; a heartbeat or an error report twice is
/// harmless).
fn try_elsewhere(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
    )
}

impl MasterClient {
    pub fn new(addresses: impl Into<AggregatorList>) -> Self {
        Self::with_timeout(addresses, CALL_TIMEOUT)
    }

    /// A client whose calls give an aggregator `timeout` to answer before moving on.
    pub fn with_timeout(addresses: impl Into<AggregatorList>, timeout: Duration) -> Self {
        Self {
            addresses: addresses.into(),
            next: 0,
            current: None,
            timeout,
        }
    }

    /// The aggregator currently talked to.
    pub fn target(&self) -> Option<&str> {
        self.current.as_ref().map(|(a, _)| a.as_str())
    }

    /// The client to call next: the hinted aggregator, the current one, or the next address,
    /// avoiding those that did not answer in time during this call (a frozen old master that
    /// followers still name until they notice) while another one is left to try.
    fn client(
        &mut self,
        addr: Option<String>,
        silent: &[String],
    ) -> Option<AggregatorClient<Channel>> {
        if let Some(addr) = addr.filter(|a| !silent.contains(a)) {
            self.current = connect(&addr, self.timeout).map(|c| (addr, c));
        }
        if self.current.is_none() {
            let addresses = self.addresses.get();
            let mut addr = String::new();
            for _ in 0..addresses.len() {
                addr = addresses[self.next % addresses.len()].clone();
                self.next += 1;
                if !silent.contains(&addr) {
                    break;
                }
            }
            self.current = connect(&addr, self.timeout).map(|c| (addr, c));
        }
        self.current.as_ref().map(|(_, c)| c.clone())
    }

    /// Calls `f` on the master, following up to a few leader hints.
    pub async fn call<T, F, Fut>(&mut self, mut f: F) -> Result<T, CallError>
    where
        F: FnMut(AggregatorClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut hint = None;
        let mut last = String::from("no attempt");
        let mut silent: Vec<String> = Vec::new();
        for _ in 0..self.addresses.get().len() + 3 {
            let Some(client) = self.client(hint.take(), &silent) else {
                self.current = None;
                continue;
            };
            match f(client).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(status) if try_elsewhere(status.code()) => {
                    if status.code() != tonic::Code::Unavailable {
                        // It took the whole timeout: do not wait on it again in this call.
                        silent.extend(self.target().map(String::from));
                    }
                    hint = status
                        .metadata()
                        .get(proto::LEADER_HINT_METADATA)
                        .and_then(|v| v.to_str().ok())
                        .map(String::from);
                    last = format!("{}: {}", self.target().unwrap_or("?"), status.message());
                    if hint.is_none() {
                        self.current = None;
                    }
                }
                Err(status) => return Err(CallError::Rejected(status)),
            }
        }
        Err(CallError::Unreachable(last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_aggregator_list_follows_the_group_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("aggregators.json");
        let list = AggregatorList::remembered(file.clone(), vec!["a:1".into(), "b:2".into()]);
        assert_eq!(list.get(), vec!["a:1", "b:2"]);
        // An empty member list (an old master) changes nothing.
        list.replace(vec![]);
        assert_eq!(list.get(), vec!["a:1", "b:2"]);
        list.replace(vec!["d:4".into(), "c:3".into()]);
        assert_eq!(list.get(), vec!["c:3", "d:4"]);
        let clone = list.clone();
        assert_eq!(clone.get(), vec!["c:3", "d:4"], "clones share the list");
        // A restarted leaf starts from the members it last heard of, then its configuration.
        let again = AggregatorList::remembered(file, vec!["a:1".into(), "c:3".into()]);
        assert_eq!(again.get(), vec!["c:3", "d:4", "a:1"]);
    }
}
