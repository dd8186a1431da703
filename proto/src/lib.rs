//! Generated gRPC code (tonic/prost) for Shardline's internal protocol: `proto/shardline.proto`.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("shardline");

/// Metadata key carrying the leader's gRPC address on an `UNAVAILABLE` answer from a non-leader.
pub const LEADER_HINT_METADATA: &str = "x-shardline-leader";

/// Largest gRPC message we send or accept (Raft snapshots travel whole).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
