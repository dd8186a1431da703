//! The aggregator's error type and its translation to gRPC statuses.

use common::ids::NodeId;

/// Errors of the aggregator's metadata, cluster and server layers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no master aggregator is elected right now (Raft has no leader); retry shortly")]
    NoLeader,
    #[error("this aggregator is not the master; the master is node {leader}")]
    NotLeader {
        leader: NodeId,
        address: Option<String>,
    },
    #[error("the write was not committed within {0:?}; the cluster may be electing a new master, retry")]
    CommitTimeout(std::time::Duration),
    #[error("the aggregator is shutting down")]
    Shutdown,
    #[error(transparent)]
    Catalog(#[from] common::Error),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("storage: {0}")]
    Storage(String),
    #[error("corrupt data in the raft store: {0}")]
    Corrupt(String),
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

/// Result with the aggregator [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match &e {
            Error::NotLeader { address, .. } => {
                let mut status = tonic::Status::unavailable(e.to_string());
                if let Some(addr) = address.as_deref().and_then(|a| a.parse().ok()) {
                    status
                        .metadata_mut()
                        .insert(proto::LEADER_HINT_METADATA, addr);
                }
                status
            }
            Error::NoLeader | Error::CommitTimeout(_) | Error::Shutdown => {
                tonic::Status::unavailable(e.to_string())
            }
            Error::Catalog(common::Error::LeafNotFound { .. }) => {
                tonic::Status::not_found(e.to_string())
            }
            Error::Catalog(_) => tonic::Status::failed_precondition(e.to_string()),
            _ => tonic::Status::internal(e.to_string()),
        }
    }
}
