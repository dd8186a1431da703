//! SQL: parsing (sqlparser-rs plus Shardline's own statements), evaluation and execution.
//!
//! - `parse`: text -> [`parse::Stmt`];
//! - `eval`: constant expressions (`SELECT 1`, `@@vars`, `DATABASE()`);
//! - `exec`: [`SqlEngine`], which runs a statement for a [`Session`];
//! - `pipelines`: pipeline and table statements;
//! - `query`: SELECT on DataFusion (leaf scans, information_schema);
//! - `env`: what a SELECT plans against, kept while the catalog's tables stay the same;
//! - `plans`: optimized plans kept per statement shape (the statement without its literals);
//! - `params`: physical plans kept per shape, the values bound in the leaves' fragments;
//! - `functions`: SingleStore's JSON and base64 functions;
//! - `result`: result sets, values and MySQL errors.

mod columnar;
mod distributed;
mod env;
pub mod eval;
pub mod exec;
mod params;
pub mod parse;
mod pipelines;
mod plans;
pub mod query;
pub mod result;

pub use exec::{Session, SqlEngine};
pub use result::{Column, ColumnKind, QueryOutput, SqlError, Value};
