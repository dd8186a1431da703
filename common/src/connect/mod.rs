//! The connector API, shaped like Kafka Connect's: a [`SourceConnector`] validates its
//! configuration and splits the work into task configs; a [`SourceTask`] starts from the
//! committed offsets, polls [`SourceRecord`]s and hears when a batch committed.
//!
//! - `avro`: FORMAT AVRO — batches of records as Avro, and back to rows;
//! - `kinesis`: `com.singlestore.kafka.connect.kinesis.KinesisSourceConnector`;
//! - `datagen`: a generator for demos and benchmarks.
//!
//! Connectors are looked up by `connector.class`; a new source is one module here.

pub mod avro;
pub mod datagen;
pub mod kinesis;
pub mod shared;

use async_trait::async_trait;
use serde_json::{Map, Value as Json};
use std::collections::BTreeMap;
use std::time::Instant;

/// CONFIG (and CREDENTIALS merged over it) as given to a connector.
pub type ConnectorConfig = Map<String, Json>;
/// One task's configuration (string values, as Kafka Connect's `Map<String, String>`).
pub type TaskConfig = BTreeMap<String, String>;

/// Why a connector or task failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The configuration is wrong; retrying will not help.
    #[error("{0}")]
    Config(String),
    /// The source refused or failed; a retry may succeed.
    #[error("{0}")]
    Source(String),
}

/// A record read from a source, with its source partition and offset (JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRecord {
    pub topic: String,
    /// The key, as an Avro value of the connector's key schema.
    pub key: apache_avro::types::Value,
    /// The value, as an Avro value of the connector's value schema.
    pub value: apache_avro::types::Value,
    /// Canonical JSON text of the source partition, e.g. `{"shardId":"shardId-000000000000"}`.
    pub source_partition: String,
    /// The offset after this record, e.g. `{"sequenceNumber":"..."}`.
    pub source_offset: Json,
    /// Approximate size in bytes (payload), for statistics.
    pub size: usize,
}

/// What a task knows of the committed offsets of its pipeline (all source partitions).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommittedOffsets {
    pub offsets: BTreeMap<String, (Json, bool)>,
    /// `Some("earliest"|"latest")` after `ALTER PIPELINE ... SET OFFSETS EARLIEST|LATEST`.
    pub start_override: Option<String>,
    /// When the pipeline's start position was fixed (unix ms, the catalog's): "latest" means
    /// the records that arrived from then on, however often a task starts before it commits.
    pub start_at_ms: Option<u64>,
}

impl CommittedOffsets {
    pub fn value(&self, partition: &str) -> Option<&Json> {
        self.offsets.get(partition).map(|(v, _)| v)
    }

    pub fn finished(&self, partition: &str) -> bool {
        self.offsets.get(partition).is_some_and(|(_, f)| *f)
    }
}

/// One poll's outcome.
#[derive(Debug, Default)]
pub struct Poll {
    pub records: Vec<SourceRecord>,
    /// Source partitions that ended (read to their end) with the offset they ended at.
    pub finished: Vec<(String, Json)>,
    /// How far behind the source's newest record each read partition is (name, milliseconds):
    /// Kinesis's MillisBehindLatest per shard.
    pub lag_ms: Vec<(String, u64)>,
}

/// The connector: validation and splitting work into tasks.
#[async_trait]
pub trait SourceConnector: Send + Sync {
    /// Checks the configuration without touching the source.
    fn validate(&self, config: &ConnectorConfig) -> Result<(), ConnectError>;

    /// Splits the work into at most `max_tasks` task configs (may ask the source).
    async fn task_configs(
        &self,
        config: &ConnectorConfig,
        max_tasks: usize,
    ) -> Result<Vec<TaskConfig>, ConnectError>;

    /// Creates a task.
    fn task(&self) -> Box<dyn SourceTask>;

    /// Avro schema of record keys.
    fn key_schema(&self) -> &apache_avro::Schema;

    /// Avro schema of record values.
    fn value_schema(&self) -> &apache_avro::Schema;
}

/// A running task.
#[async_trait]
pub trait SourceTask: Send {
    /// Starts from the committed offsets.
    async fn start(
        &mut self,
        config: &ConnectorConfig,
        task: &TaskConfig,
        offsets: &CommittedOffsets,
    ) -> Result<(), ConnectError>;

    /// Returns up to `max_records` records, waiting at most until `deadline` for them.
    async fn poll(&mut self, max_records: usize, deadline: Instant) -> Result<Poll, ConnectError>;

    /// The records polled so far were committed (offsets are now `offsets`).
    fn commit(&mut self, offsets: &CommittedOffsets);

    /// Newer committed offsets of the pipeline (other tasks' progress), e.g. for
    /// parent-before-child ordering of Kinesis shards.
    fn observe(&mut self, offsets: &CommittedOffsets);

    /// The source partitions `partition` continues (a Kinesis child shard's parents), which
    /// must have ended before it was read. Its first commit lets the catalog forget their
    /// offsets (they stay ended for the task: a partition with a committed descendant is done),
    /// so a stream resharded for months does not pile up ended shards.
    fn continues(&self, _partition: &str) -> Vec<String> {
        Vec::new()
    }
}

/// `tasks.max` from CONFIG: a positive integer (number or string), default 4.
pub fn tasks_max(config: &ConnectorConfig) -> Result<usize, ConnectError> {
    match config.get("tasks.max") {
        None => Ok(4),
        Some(v) => {
            let n = match v {
                Json::Number(n) => n.as_u64(),
                Json::String(s) => s.trim().parse().ok(),
                _ => None,
            };
            match n {
                Some(n) if (1..=1024).contains(&n) => Ok(n as usize),
                _ => Err(ConnectError::Config(format!(
                    "tasks.max must be an integer between 1 and 1024, got {v}"
                ))),
            }
        }
    }
}

/// A string config value (numbers and booleans are accepted as text).
pub fn config_str(config: &ConnectorConfig, key: &str) -> Option<String> {
    match config.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Null => None,
        other => Some(other.to_string()),
    }
}

/// A required string config value.
pub fn required(config: &ConnectorConfig, key: &str) -> Result<String, ConnectError> {
    config_str(config, key)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ConnectError::Config(format!("CONFIG is missing the required key '{key}'")))
}

/// A non-negative integer config value with a default.
pub fn config_u64(config: &ConnectorConfig, key: &str, default: u64) -> Result<u64, ConnectError> {
    match config_str(config, key) {
        None => Ok(default),
        Some(s) => s.trim().parse().map_err(|_| {
            ConnectError::Config(format!("'{key}' must be a non-negative integer, got '{s}'"))
        }),
    }
}

/// Looks a connector up by `connector.class`.
pub fn connector(class: &str) -> Result<Box<dyn SourceConnector>, ConnectError> {
    match class {
        kinesis::CLASS => Ok(Box::new(kinesis::KinesisConnector::new())),
        datagen::CLASS => Ok(Box::new(datagen::DatagenConnector::new())),
        other => Err(ConnectError::Config(format!(
            "unknown connector.class '{other}'; known: {}, {}",
            kinesis::CLASS,
            datagen::CLASS
        ))),
    }
}

/// CONFIG merged with CREDENTIALS (credentials win), as a connector sees it.
pub fn effective_config(
    config: &ConnectorConfig,
    credentials: &str,
) -> Result<ConnectorConfig, ConnectError> {
    let mut merged = config.clone();
    let trimmed = credentials.trim();
    if trimmed.is_empty() {
        return Ok(merged);
    }
    let creds: Json = serde_json::from_str(trimmed)
        .map_err(|e| ConnectError::Config(format!("CREDENTIALS is not valid JSON: {e}")))?;
    let Json::Object(creds) = creds else {
        return Err(ConnectError::Config(
            "CREDENTIALS must be a JSON object".into(),
        ));
    };
    merged.extend(creds);
    Ok(merged)
}

/// Validates a pipeline's CONFIG: a JSON object with a known `connector.class` whose
/// connector accepts it.
pub fn validate_config(config: &ConnectorConfig) -> Result<(), ConnectError> {
    let class = required(config, "connector.class")?;
    let c = connector(&class)?;
    tasks_max(config)?;
    c.validate(config)
}
