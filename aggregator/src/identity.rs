//! An aggregator's identity: the cluster it belongs to and its node id, kept in its data
//! directory (`identity.json`), and the decision a node makes at startup about how it takes part
//! in Raft.
//!
//! A Raft member's safety rests on what its disk remembers: its vote and the entries it
//! acknowledged. A node whose data directory is new must therefore never count as the member
//! that id used to be. At startup:
//! - a data directory with an identity (or, from before identities, a Raft store) carries on;
//!   an identity of another node id is refused;
//! - a new data directory asks its peers ([`proto::IdentityRequest`]). If one of them belongs
//!   to a running cluster, the node asks to join ([`proto::JoinClusterRequest`]): the catalog
//!   refuses an id that has joined before (a wiped member: it must be replaced through a
//!   configuration change, REMOVE AGGREGATOR then ADD AGGREGATOR under a new id), and an id that
//!   is not a member waits until ADD AGGREGATOR makes it one. If every peer answers and none
//!   belongs to a cluster yet, the members are creating one together: it bootstraps with the
//!   `--peers` voters. While some peer does not answer, it waits: it cannot tell a new cluster
//!   from a wiped member, and guessing wrong could lose acknowledged writes.
//!
//! The one window this leaves is a cluster's first seconds: a member wiped after it started
//! Raft and before the first master recorded the cluster's identity bootstraps again.

use crate::config::AggregatorConfig;
use crate::raft::Membership;
use proto::aggregator_client::AggregatorClient;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What `identity.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub node_id: u64,
    /// Unknown until the first master has recorded it (a cluster being created).
    pub cluster_id: Option<String>,
}

const FILE: &str = "identity.json";
/// The request id of a join in progress: a node that restarts mid-join asks again with the
/// same id, and the catalog answers with the first outcome instead of "already joined".
const JOIN_REQUEST_FILE: &str = "join-request";

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The identity in `dir`, if it has one.
pub fn load(dir: &Path) -> Result<Option<Identity>, String> {
    match std::fs::read(path(dir)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{} is not a valid identity: {e}", path(dir).display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path(dir).display())),
    }
}

/// Writes `identity` to `dir` atomically and durably (a crash leaves the old one or the new).
pub fn save(dir: &Path, identity: &Identity) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(identity).map_err(|e| e.to_string())?;
    write_durably(dir, FILE, &bytes)
}

fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", dir.join(name).display());
    let tmp = dir.join(format!("{name}.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        f.write_all(bytes).map_err(fail)?;
        f.sync_all().map_err(fail)?;
    }
    std::fs::rename(&tmp, dir.join(name)).map_err(fail)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail)
}

fn join_request_id(dir: &Path) -> Result<u64, String> {
    if let Ok(text) = std::fs::read_to_string(dir.join(JOIN_REQUEST_FILE)) {
        if let Ok(id) = text.trim().parse() {
            return Ok(id);
        }
    }
    let id = rand::random::<u64>();
    write_durably(dir, JOIN_REQUEST_FILE, id.to_string().as_bytes())?;
    Ok(id)
}

/// Records the cluster id in the identity once the catalog knows it (a member of a cluster
/// being created learns it from the first master).
pub fn record_cluster_id(dir: &Path, cluster_id: &str) -> Result<(), String> {
    let Some(mut identity) = load(dir)? else {
        return Ok(());
    };
    match identity.cluster_id.as_deref() {
        Some(known) if known == cluster_id => Ok(()),
        Some(known) => Err(format!(
            "this aggregator's data directory belongs to cluster {known}, but its catalog is cluster {cluster_id}'s"
        )),
        None => {
            identity.cluster_id = Some(cluster_id.to_string());
            save(dir, &identity)
        }
    }
}

/// Decides how this node takes part in Raft (see the module docs); waits while it cannot
/// tell. Errors are final: the node must not start.
pub async fn decide(
    config: &AggregatorConfig,
    shutdown: &CancellationToken,
) -> Result<Membership, String> {
    let dir = &config.data_dir;
    match load(dir)? {
        Some(identity) if identity.node_id != config.node_id => {
            return Err(format!(
                "the data directory {} belongs to aggregator {}, not to --node-id {}",
                dir.display(),
                identity.node_id,
                config.node_id
            ));
        }
        Some(_) if !dir.join("raft").exists() => {
            return Err(format!(
                "the data directory {} has this node's identity but no raft store: its Raft state was lost, so it must be replaced as a member that lost its data (docs/operations.md)",
                dir.display()
            ));
        }
        Some(_) => return Ok(Membership::Existing),
        None if dir.join("raft").exists() => {
            // A data directory from before identities: it is this member's own.
            save(
                dir,
                &Identity {
                    node_id: config.node_id,
                    cluster_id: None,
                },
            )?;
            return Ok(Membership::Existing);
        }
        None => {}
    }
    let me = config.node_id;
    let peers: Vec<(u64, String)> = config
        .peer_map()
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|(id, _)| id.0 != me)
        .map(|(id, addr)| (id.0, addr))
        .collect();
    let fresh = Identity {
        node_id: me,
        cluster_id: None,
    };
    if peers.is_empty() {
        save(dir, &fresh)?;
        return Ok(Membership::Bootstrap);
    }
    let mut last_log = None::<tokio::time::Instant>;
    let mut log = |msg: String| {
        if last_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            tracing::warn!("{msg}");
            last_log = Some(tokio::time::Instant::now());
        }
    };
    loop {
        let answers = futures::future::join_all(
            peers
                .iter()
                .map(|(id, addr)| async move { (*id, addr, ask_identity(addr, me).await) }),
        )
        .await;
        let in_cluster: Vec<&String> = answers
            .iter()
            .filter_map(|(_, addr, a)| {
                a.as_ref()
                    .ok()
                    .filter(|r| !r.cluster_id.is_empty())
                    .map(|_| *addr)
            })
            .collect();
        let silent: Vec<String> = answers
            .iter()
            .filter(|(_, _, a)| a.is_err())
            .map(|(id, addr, _)| format!("{id} ({addr})"))
            .collect();
        if !in_cluster.is_empty() {
            let request_id = join_request_id(dir)?;
            for addr in in_cluster {
                match join(addr, me, request_id).await {
                    Ok(cluster_id) => {
                        save(
                            dir,
                            &Identity {
                                node_id: me,
                                cluster_id: Some(cluster_id.clone()),
                            },
                        )?;
                        let _ = std::fs::remove_file(dir.join(JOIN_REQUEST_FILE));
                        tracing::info!(%cluster_id, "joined the cluster with a new data directory");
                        return Ok(Membership::Join);
                    }
                    Err(JoinError::Refused(reason)) => return Err(reason),
                    Err(JoinError::NotYet(reason)) => {
                        log(format!("waiting to join the cluster: {reason}"));
                        break;
                    }
                    Err(JoinError::Failed(reason)) => {
                        log(format!(
                            "joining through {addr} failed, will retry: {reason}"
                        ));
                    }
                }
            }
        } else if silent.is_empty() {
            save(dir, &fresh)?;
            tracing::info!("every peer is new too: creating a new cluster");
            return Ok(Membership::Bootstrap);
        } else {
            log(format!(
                "this data directory is new: waiting for aggregators {} to answer, to learn whether a cluster exists (a member that lost its data must not rejoin under its old id)",
                silent.join(", ")
            ));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err("stopped before joining a cluster".into()),
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

fn client(addr: &str) -> Result<AggregatorClient<tonic::transport::Channel>, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(15));
    Ok(AggregatorClient::new(endpoint.connect_lazy()))
}

async fn ask_identity(addr: &str, me: u64) -> Result<proto::IdentityResponse, String> {
    let mut c = client(addr)?;
    let call = c.identity(proto::IdentityRequest { node_id: me });
    match tokio::time::timeout(Duration::from_secs(1), call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(status.message().to_string()),
        Err(_) => Err("timed out".into()),
    }
}

enum JoinError {
    /// The cluster will never take this node under this id.
    Refused(String),
    /// Not a member yet (ADD AGGREGATOR has not run), or no master right now.
    NotYet(String),
    Failed(String),
}

async fn join(addr: &str, me: u64, request_id: u64) -> Result<String, JoinError> {
    let mut c = client(addr).map_err(JoinError::Failed)?;
    let call = c.join_cluster(proto::JoinClusterRequest {
        node_id: me,
        request_id,
    });
    match call.await {
        Ok(r) => Ok(r.into_inner().cluster_id),
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            Err(JoinError::Refused(s.message().to_string()))
        }
        Err(s) if s.code() == tonic::Code::NotFound => {
            Err(JoinError::NotYet(s.message().to_string()))
        }
        Err(s) => Err(JoinError::Failed(s.message().to_string())),
    }
}
