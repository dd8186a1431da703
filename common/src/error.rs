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
    #[error("Kafka Connect pipelines are disabled; enable them with SET GLOBAL experimental_features_config = \"kafka_connect_enabled=true\"")]
    FeatureDisabled,
}

/// Result with the catalog [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
