//! End-to-end tests against real `aggregator` and `leaf` processes.
//! Build the binaries first: `cargo build --bins` (the README's test command does).

mod bad_input;
mod chaos;
mod cluster;
mod harness;
mod kinesis;
mod membership;
mod pipelines;
mod queries;
mod scenarios;
