//! What both ends of a Shardline query share.
//!
//! The aggregator plans every SELECT with DataFusion; the part of the plan that reads a table
//! (its scan, and the filters, projections, partial aggregates and limits right above it) runs
//! on the leaves that hold the table's partitions, also in DataFusion, so each function has one
//! implementation ([`functions`]) and each operator one semantics, whichever node runs it.
//!
//! - [`functions`]: SingleStore's JSON, base64 and length functions as DataFusion UDFs;
//! - [`scan`]: [`scan::LeafScanExec`], the bottom of a leaf's part of a plan;
//! - [`fragment`]: that part as bytes (datafusion-proto) and back;
//! - [`columns`]: a table's columns on the wire;
//! - [`session`]: the DataFusion configuration and the query threads both ends use.

pub mod columns;
pub mod derive;
pub mod fragment;
pub mod functions;
pub mod scan;
pub mod session;
