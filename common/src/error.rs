//! Errors raised while applying a command to the catalog.
//!
//! These are deterministic: every replica applying the same command reaches the same error,
//! so they travel back to the proposer as part of the command's result.

use serde::{Deserialize, Serialize};

/// A catalog command that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Error {
    #[error("Can't create database '{name}'; database exists")]
    DatabaseExists { name: String },
    #[error("Can't drop database '{name}'; database doesn't exist")]
    DatabaseNotFound { name: String },
    #[error("Can't create database '{name}': no leaves are online to hold its partitions")]
    NoLeavesOnline { name: String },
    #[error("Invalid partition count {count} for database '{name}': must be between 1 and {max}")]
    InvalidPartitionCount { name: String, count: u32, max: u32 },
    #[error("Unknown system variable '{name}'")]
    UnknownVariable { name: String },
    #[error("Variable '{name}' can't be set to the value of '{value}': {reason}")]
    InvalidVariableValue {
        name: String,
        value: String,
        reason: String,
    },
    #[error("Variable '{name}' is a read only variable")]
    ReadOnlyVariable { name: String },
    #[error("Unknown database '{name}'")]
    UnknownDatabase { name: String },
    #[error("Unknown leaf {id}")]
    LeafNotFound { id: u64 },
    #[error("Pipeline '{name}' already exists")]
    PipelineExists { name: String },
    #[error("Pipeline '{name}' doesn't exist")]
    PipelineNotFound { name: String },
    #[error("Pipeline '{name}' is already running")]
    PipelineRunning { name: String },
    #[error("Pipeline '{name}' is not running")]
    PipelineNotRunning { name: String },
    #[error("Pipeline '{name}': {reason}")]
    InvalidPipeline { name: String, reason: String },
    #[error("Pipeline '{pipeline}' has no task {task}")]
    TaskNotFound { pipeline: String, task: u32 },
    #[error("Pipeline '{pipeline}' task {task}: epoch {epoch} is stale (current {current}); the task moved")]
    StaleEpoch {
        pipeline: String,
        task: u32,
        epoch: u64,
        current: u64,
    },
    #[error("Pipeline '{pipeline}': the committed offset of {key} changed under the batch")]
    OffsetConflict { pipeline: String, key: String },
    #[error("Table '{database}.{name}' already exists")]
    TableExists { database: String, name: String },
    #[error("Duplicate key name '{name}'")]
    DuplicateIndex { name: String },
    #[error("Can't DROP '{name}'; check that column/key exists")]
    UnknownIndex { name: String },
    #[error("Key column '{name}' doesn't exist in table")]
    UnknownColumn { name: String },
    #[error("Duplicate column name '{name}'")]
    DuplicateColumn { name: String },
    #[error("Table '{database}.{name}' doesn't exist")]
    TableNotFound { database: String, name: String },
    #[error("The cluster has no identity yet: no master has been elected since it was created")]
    ClusterNotInitialized,
    #[error("Aggregator {node} has joined this cluster before and its data directory is gone: a member that lost its data must not rejoin under its old id (it has forgotten its Raft vote and the writes it acknowledged). Replace it: REMOVE AGGREGATOR {node}, then ADD AGGREGATOR <new id> '<host>:<grpc port>', and start the new node with that id (docs/operations.md)")]
    MemberAlreadyJoined { node: u64 },
    #[error("Aggregator {node} is not a member of this cluster: add it first with ADD AGGREGATOR {node} '<host>:<grpc port>'")]
    NotAMember { node: u64 },
    #[error("Aggregator id {node} was removed from this cluster and can't be used again: choose a new id")]
    MemberRemoved { node: u64 },
    #[error("Aggregator {node} is already a member of this cluster")]
    MemberExists { node: u64 },
    #[error("Address {address} is already used by aggregator {node}")]
    MemberAddressInUse { address: String, node: u64 },
    #[error("Aggregator {node} is the master and can't remove itself: stop it first (the others elect a new master), then remove it")]
    RemoveMaster { node: u64 },
    #[error("Can't remove aggregator {node}: it is the last member")]
    LastMember { node: u64 },
    #[error("Kafka Connect pipelines are disabled; enable them with SET GLOBAL experimental_features_config = \"kafka_connect_enabled=true\"")]
    FeatureDisabled,
}

/// Result with the catalog [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
