//! A task as the master assigned it, in the form the runner uses: read from its wire form
//! (`proto::TaskAssignment`) once per change, at the edge, so the load path never parses
//! offsets or compiles a table's columns per batch.

use common::catalog::tables::TableColumn;
use common::connect::CommittedOffsets;
use common::expr::Expr;
use serde_json::Value as Json;
use std::sync::Arc;

/// A table's columns with their computed expressions compiled.
#[derive(Debug, Default)]
pub struct TableDef {
    pub columns: Vec<TableColumn>,
    pub compiled: Vec<Option<Expr>>,
}

impl TableDef {
    pub fn new(columns: Vec<TableColumn>) -> Result<Self, String> {
        let compiled = common::expr::compile_table(&columns)?;
        Ok(Self { columns, compiled })
    }

    /// From the wire form of the columns.
    pub fn from_proto(columns: &[proto::Column]) -> Result<Self, String> {
        Self::new(query::columns::from_proto(columns)?)
    }
}

/// One task of a pipeline on this leaf.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub pipeline_id: u64,
    pub pipeline: String,
    pub database: String,
    pub table: String,
    /// The target table's id (its rows are stored under it).
    pub table_id: u64,
    pub task_id: u32,
    pub epoch: u64,
    /// CONFIG merged with CREDENTIALS. Secret: never logged.
    pub config_json: String,
    pub task_config_json: String,
    /// The pipeline's committed offsets and start position.
    pub offsets: CommittedOffsets,
    pub batch_size: u64,
    pub max_batch_interval_ms: u64,
    pub batch_interval_ms: u64,
    pub max_retries: u32,
    pub stop_on_error: bool,
    /// This leaf's partitions of the database.
    pub partitions: Vec<u32>,
    /// The target table's columns, or why they cannot be used (a batch then fails with it,
    /// and the pipeline shows it).
    pub columns: Result<Arc<TableDef>, String>,
}

impl Default for Assignment {
    fn default() -> Self {
        Self::from_proto(&proto::TaskAssignment::default())
    }
}

impl Assignment {
    /// The assignment a master sent (its offsets already merged into a full set).
    pub fn from_proto(a: &proto::TaskAssignment) -> Self {
        Self {
            pipeline_id: a.pipeline_id,
            pipeline: a.pipeline.clone(),
            database: a.database.clone(),
            table: a.table.clone(),
            table_id: a.table_id,
            task_id: a.task_id,
            epoch: a.epoch,
            config_json: a.config_json.clone(),
            task_config_json: a.task_config_json.clone(),
            offsets: CommittedOffsets {
                start_override: (!a.start_override.is_empty()).then(|| a.start_override.clone()),
                start_at_ms: (a.start_at_ms != 0).then_some(a.start_at_ms),
                ..committed_offsets(&a.offsets)
            },
            batch_size: a.batch_size,
            max_batch_interval_ms: a.max_batch_interval_ms,
            batch_interval_ms: a.batch_interval_ms,
            max_retries: a.max_retries,
            stop_on_error: a.stop_on_error,
            partitions: a.partitions.clone(),
            columns: TableDef::from_proto(&a.columns)
                .map(Arc::new)
                .map_err(|e| format!("bad table columns: {e}")),
        }
    }
}

/// Committed offsets from their wire form (a value that is not JSON reads as null: the
/// master wrote it from a JSON value).
pub fn committed_offsets(offsets: &[proto::SourceOffset]) -> CommittedOffsets {
    CommittedOffsets {
        offsets: offsets
            .iter()
            .map(|o| {
                let value = serde_json::from_str(&o.value_json).unwrap_or(Json::Null);
                (o.key.clone(), (value, o.finished))
            })
            .collect(),
        ..Default::default()
    }
}
