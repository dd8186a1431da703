//! Types shared by the aggregator and the leaf.
//!
//! - [`ids`]: newtype ids (`LeafId`, `NodeId`).
//! - [`catalog`]: the Raft state machine — everything a restart must not lose.
//! - [`variables`]: engine variables, their defaults and validation.
//! - [`error`]: the catalog error type.

pub mod catalog;
pub mod error;
pub mod ids;
pub mod variables;

pub use error::{Error, Result};
