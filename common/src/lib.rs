//! Types shared by the aggregator and the leaf.
//!
//! - [`arrow`]: table rows as Arrow record batches (IPC between leaves and aggregators);
//! - [`ids`]: newtype ids (`LeafId`, `NodeId`).
//! - [`catalog`]: the Raft state machine — everything a restart must not lose.
//! - [`connect`]: the connector API (Kafka Connect shaped), Avro, Kinesis and datagen.
//! - [`json`]: SingleStore's JSON/base64 function semantics;
//! - [`expr`]: computed-column expressions, evaluated where rows are written;
//! - [`metrics`]: Prometheus counters and gauges;
//! - [`variables`]: engine variables, their defaults and validation.
//! - [`error`]: the catalog error type.

pub mod arrow;
pub mod catalog;
pub mod connect;
pub mod datadir;
pub mod error;
pub mod expr;
pub mod health;
pub mod ids;
pub mod json;
pub mod metrics;
pub mod net;
pub mod variables;

pub use error::{Error, Result};
