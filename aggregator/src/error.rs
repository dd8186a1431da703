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
    #[error(
        "the write was not committed within {0:?}; the cluster may be electing a new master, retry"
    )]
    CommitTimeout(std::time::Duration),
    #[error("the aggregator is shutting down")]
    Shutdown,
    #[error("the master changed before the write was committed; it was not applied")]
    ProposalLost,
    #[error("forwarding the write to the master failed: {0}")]
    Forward(String),
    #[error("the master did not confirm the write ({0}); it may or may not have been applied")]
    CommitUnknown(String),
    #[error("this aggregator is not in contact with a master aggregator (none confirmed within {0:?}); its view of the cluster may be stale: retry, or connect to another aggregator")]
    NoMasterContact(std::time::Duration),
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

impl Error {
    /// Whether the write certainly did not happen and may be tried again on the (new) master.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NoLeader | Error::NotLeader { .. } | Error::ProposalLost | Error::Forward(_)
        )
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
            Error::NoLeader
            | Error::CommitTimeout(_)
            | Error::Shutdown
            | Error::ProposalLost
            | Error::Forward(_)
            | Error::CommitUnknown(_)
            | Error::NoMasterContact(_) => tonic::Status::unavailable(e.to_string()),
            Error::Catalog(common::Error::LeafNotFound { .. }) => {
                tonic::Status::not_found(e.to_string())
            }
            Error::Catalog(_) => tonic::Status::failed_precondition(e.to_string()),
            _ => tonic::Status::internal(e.to_string()),
        }
    }
}
