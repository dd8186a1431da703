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
    #[error("Unknown leaf {id}")]
    LeafNotFound { id: u64 },
}

/// Result with the catalog [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
