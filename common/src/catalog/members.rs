//! The aggregators' Raft membership as the catalog mirrors it: the cluster's identity, every
//! member's gRPC address, which members have joined with a data directory, and the ids that
//! were removed (never used again).
//!
//! A member "joins" once, when it first starts with an empty data directory (or, for the
//! members a cluster was created with, when the first master records them all). A member whose
//! data directory is wiped has forgotten its Raft vote and the log entries it acknowledged, so
//! it must not take part under its old id: its join is refused, and the documented replacement
//! is a Raft configuration change (REMOVE AGGREGATOR the old id, ADD AGGREGATOR a new one).

use super::{Catalog, Command, Output};
use crate::error::{Error, Result};
use crate::ids::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One voting member of the aggregators' Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `host:port` of its gRPC service (Raft traffic, forwarded writes, leaves).
    pub grpc_address: String,
    /// Whether a node has started under this id with a data directory of its own. A member
    /// added by ADD AGGREGATOR has not, until the new node starts and joins.
    pub joined: bool,
}

/// A Raft configuration change, as the catalog command that rides in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberChange {
    Add(NodeId),
    Remove(NodeId),
}

impl Command {
    /// The Raft configuration change this command is (unwrapping a request id), if any: it is
    /// proposed as a Raft conf change, with the command in the change's context.
    pub fn member_change(&self) -> Option<MemberChange> {
        match self {
            Command::Request { command, .. } => command.member_change(),
            Command::AddMember { node, .. } => Some(MemberChange::Add(*node)),
            Command::RemoveMember { node } => Some(MemberChange::Remove(*node)),
            _ => None,
        }
    }
}

impl Catalog {
    /// Checks a membership change before it is proposed: once Raft commits a configuration
    /// change it takes effect whatever the catalog says, so the catalog side cannot refuse it
    /// at apply time. A request already applied passes (its retry gets the first outcome).
    pub fn check_member_change(&mut self, command: &Command) -> Result<()> {
        match command {
            Command::Request { id, command } => {
                if self.requests.get(*id).is_some() {
                    return Ok(());
                }
                self.check_member_change(command)
            }
            Command::AddMember { node, grpc_address } => {
                if self.cluster_id.is_none() {
                    return Err(Error::ClusterNotInitialized);
                }
                if self.removed_members.contains(node) {
                    return Err(Error::MemberRemoved { node: node.0 });
                }
                if self.members.contains_key(node) {
                    return Err(Error::MemberExists { node: node.0 });
                }
                if let Some((other, _)) = self
                    .members
                    .iter()
                    .find(|(_, m)| m.grpc_address == *grpc_address)
                {
                    return Err(Error::MemberAddressInUse {
                        address: grpc_address.clone(),
                        node: other.0,
                    });
                }
                Ok(())
            }
            Command::RemoveMember { node } => {
                if self.cluster_id.is_none() {
                    return Err(Error::ClusterNotInitialized);
                }
                if !self.members.contains_key(node) {
                    return Err(Error::NotAMember { node: node.0 });
                }
                if self.members.len() == 1 {
                    return Err(Error::LastMember { node: node.0 });
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The gRPC address of every member (empty before the cluster has its identity).
    pub fn member_addresses(&self) -> BTreeMap<NodeId, String> {
        self.members
            .iter()
            .map(|(id, m)| (*id, m.grpc_address.clone()))
            .collect()
    }

    pub(super) fn init_cluster(
        &mut self,
        cluster_id: String,
        members: BTreeMap<NodeId, String>,
    ) -> Result<Output> {
        if self.cluster_id.is_some() {
            return Ok(Output::Unchanged);
        }
        self.cluster_id = Some(cluster_id);
        self.members = members
            .into_iter()
            .map(|(id, grpc_address)| {
                let joined = true;
                (
                    id,
                    Member {
                        grpc_address,
                        joined,
                    },
                )
            })
            .collect();
        Ok(Output::Done)
    }

    pub(super) fn join_member(&mut self, node: NodeId) -> Result<Output> {
        let Some(cluster_id) = self.cluster_id.clone() else {
            return Err(Error::ClusterNotInitialized);
        };
        if self.removed_members.contains(&node) {
            return Err(Error::MemberRemoved { node: node.0 });
        }
        let Some(member) = self.members.get_mut(&node) else {
            return Err(Error::NotAMember { node: node.0 });
        };
        if member.joined {
            return Err(Error::MemberAlreadyJoined { node: node.0 });
        }
        member.joined = true;
        Ok(Output::Cluster(cluster_id))
    }

    /// Mirrors a Raft configuration change that has already taken effect: it cannot fail
    /// ([`Catalog::check_member_change`] refused the bad ones before they were proposed).
    pub(super) fn add_member(&mut self, node: NodeId, grpc_address: String) -> Result<Output> {
        if self.members.contains_key(&node) {
            return Ok(Output::Unchanged);
        }
        let joined = false;
        self.members.insert(
            node,
            Member {
                grpc_address,
                joined,
            },
        );
        Ok(Output::Done)
    }

    /// Mirrors a Raft configuration change that has already taken effect, like `add_member`.
    pub(super) fn remove_member(&mut self, node: NodeId) -> Result<Output> {
        self.aggregators.remove(&node);
        self.removed_members.insert(node);
        Ok(match self.members.remove(&node) {
            Some(_) => Output::Done,
            None => Output::Unchanged,
        })
    }
}
