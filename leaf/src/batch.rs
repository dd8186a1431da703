//! One batch on its way into a table (`BatchJob`): its records become rows (`Load`: FORMAT AVRO,
//! computed columns, partitions), are prepared in the store, committed at the master and made
//! visible, or deleted when the master refuses them; and how a batch attempt ends.

use crate::client::{CallError, MasterClient};
use crate::commits::Committer;
use crate::store::{BatchKey, Store, TableRef};
use crate::tasks::{resolve, TableDef};
use common::connect::{self, avro};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Set in a leaf's environment (tests only) to a partition key: a batch holding a record whose
/// key contains it fails to load, every time.
pub const POISON_KEY: &str = "SHARDLINE_TEST_POISON_KEY";

/// Set in a leaf's environment (tests only), the leaf exits right after the master committed
/// its first batch, before making it visible.
pub const EXIT_BEFORE_FINALIZE: &str = "SHARDLINE_TEST_EXIT_BEFORE_FINALIZE";

/// Set in a leaf's environment (tests only) to a file path: the first task of this leaf that has
/// committed two batches forgets its own commits once, as a task restarted from offsets older
/// than its last commit does (an old assignment after a failover), and creates the file so that
/// it happens once per cluster. Its next batch is refused (offset conflict) and must resync.
pub const STALE_OFFSETS_ONCE: &str = "SHARDLINE_TEST_STALE_OFFSETS_ONCE";

/// Whether the [`STALE_OFFSETS_ONCE`] fault is due now (and, if so, it is used up).
pub(crate) fn stale_offsets_due(committed_batches: u64) -> bool {
    let Some(flag) = std::env::var_os(STALE_OFFSETS_ONCE) else {
        return false;
    };
    committed_batches == 2
        && std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(flag)
            .is_ok()
}

/// One extracted batch on its way into the table: load, prepare, commit at the master,
/// finalize. Runs beside the extraction of the next batch.
pub(crate) struct BatchJob {
    pub key: BatchKey,
    /// When the batch's extraction began: BATCH_TIME runs from there to the end of prepare.
    pub start: Instant,
    pub table: TableRef,
    /// Taken when the job runs.
    pub load: Option<Load>,
    pub commit: common::catalog::pipelines::BatchCommit,
    pub pipeline: String,
    pub store: Store,
    pub client: MasterClient,
    pub committer: Committer,
    pub metrics: Arc<common::metrics::Metrics>,
    pub cancel: CancellationToken,
    pub leaf_shutdown: CancellationToken,
}

impl BatchJob {
    pub async fn run(mut self) -> Result<Outcome, RunError> {
        let result = self.load_and_commit().await;
        if let Ok(Outcome::Refused(_)) = &result {
            self.count("shardline_batches_failed_total", 1.0);
        }
        result
    }

    /// Adds to one of this pipeline's counters.
    fn count(&self, name: &str, by: f64) {
        let label = common::metrics::label(&self.pipeline);
        self.metrics
            .add(&format!("{name}{{pipeline=\"{label}\"}}"), by);
    }

    async fn load_and_commit(&mut self) -> Result<Outcome, RunError> {
        let load = self
            .load
            .take()
            .ok_or_else(|| RunError::Failed("a batch loaded twice".into()))?;
        let table_def = load.table.clone();
        // CPU work (Avro, JSON, expressions): off the runtime's workers, which poll the sources.
        let rows = tokio::task::spawn_blocking(move || load.rows())
            .await
            .map_err(|e| RunError::Failed(format!("batch loader stopped: {e}")))?
            .map_err(RunError::Failed)?;
        if let Some(def) = &table_def {
            self.store
                .note_columns(&self.table, &def.columns)
                .map_err(|e| RunError::Failed(e.to_string()))?;
        }
        self.store
            .prepare(self.key, &self.table, &rows)
            .await
            .map_err(|e| RunError::Failed(e.to_string()))?;
        self.commit.batch_time_ms = self.start.elapsed().as_millis() as u64;
        let committing = Instant::now();
        let outcome = self.commit().await?;
        if let Outcome::Continue = outcome {
            self.count("shardline_rows_loaded_total", self.commit.rows as f64);
            self.count("shardline_bytes_loaded_total", self.commit.bytes as f64);
            self.count("shardline_batches_committed_total", 1.0);
            self.count(
                "shardline_commit_seconds_sum",
                committing.elapsed().as_secs_f64(),
            );
            self.count("shardline_commit_seconds_count", 1.0);
        }
        Ok(outcome)
    }

    /// The master committed the batch: make its rows visible.
    fn committed(&self, batch_id: u64) -> Result<Outcome, RunError> {
        if std::env::var_os(EXIT_BEFORE_FINALIZE).is_some() {
            // Fault injection for the tests: die in the window between the master's commit
            // and finalize, as a crash there would.
            tracing::error!("{EXIT_BEFORE_FINALIZE} is set: exiting after a commit");
            std::process::exit(86);
        }
        self.store
            .finalize(self.key)
            .map_err(|e| RunError::Failed(e.to_string()))?;
        tracing::debug!(key = ?self.key, batch_id, rows = self.commit.rows, "batch committed");
        Ok(Outcome::Continue)
    }

    /// Commits the prepared batch at the master, retrying while the answer is unknown.
    async fn commit(&mut self) -> Result<Outcome, RunError> {
        let key = self.key;
        let body = crate::commits::to_proto(&self.commit);
        let mut backoff = Duration::from_millis(50);
        loop {
            let settled = match self.committer.commit(body.clone()).await {
                Ok(o) => match o.status() {
                    proto::BatchStatus::Committed => return self.committed(o.batch_id),
                    proto::BatchStatus::Refused => Some(Ok(Outcome::Refused(o.reason))),
                    proto::BatchStatus::Invalid => Some(Err(RunError::Failed(format!(
                        "commit refused: {}",
                        o.reason
                    )))),
                    proto::BatchStatus::Unknown => {
                        tracing::debug!(?key, "commit outcome unknown, retrying: {}", o.reason);
                        None
                    }
                },
                Err(CallError::Rejected(status))
                    if status.code() == tonic::Code::InvalidArgument =>
                {
                    Some(Err(RunError::Failed(format!(
                        "commit refused: {}",
                        status.message()
                    ))))
                }
                Err(e) => {
                    tracing::debug!(?key, "commit outcome unknown, retrying: {e}");
                    None
                }
            };
            if let Some(end) = settled {
                // It never will commit: its rows go.
                self.store
                    .abort(key)
                    .map_err(|e| RunError::Failed(e.to_string()))?;
                return end;
            }
            if self.cancel.is_cancelled() {
                // We are being stopped with the outcome unknown: settle it for good.
                let shutdown = self.leaf_shutdown.clone();
                match resolve(&self.store, &mut self.client, key, &shutdown).await {
                    Some(true) => return Ok(Outcome::Continue),
                    _ => return Ok(Outcome::Refused("stopped".into())),
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

/// Per source partition, the offset a batch moves to and whether the partition ended there.
pub(crate) type LastOffsets = BTreeMap<String, (Json, bool)>;

/// A batch that failed to load or commit: what committing its offsets without its rows takes
/// (STOP_ON_ERROR OFF skips it so).
pub(crate) struct FailedBatch {
    pub commit: common::catalog::pipelines::BatchCommit,
    pub table: TableRef,
    pub last: LastOffsets,
}

/// How a batch attempt ended.
pub(crate) enum Outcome {
    /// Committed (or nothing to commit): go on.
    Continue,
    /// Refused by the master: this task's view is stale; stop and wait to be reassigned.
    Refused(String),
}

/// How `records` records split into equal runs over `partitions` partitions: the run length,
/// and how many runs (partitions used; fewer than `partitions` when records are few).
pub(crate) fn runs(records: usize, partitions: usize) -> (usize, usize) {
    let run = records.div_ceil(partitions.max(1)).max(1);
    (run, records.div_ceil(run))
}

/// What a batch job turns into rows: FORMAT AVRO (the batch travels as one Avro container
/// that the loader decodes), then computed columns evaluated, each row in its partition.
pub(crate) struct Load {
    pub schema: Arc<avro::Schema>,
    pub records: Vec<connect::SourceRecord>,
    /// The target table (compiled once per assignment); `None` for a batch of no rows.
    pub table: Option<Arc<TableDef>>,
    pub partitions: Vec<u32>,
    /// Where in `partitions` the first run of records goes (round robin across batches).
    pub first_partition: usize,
}

impl Load {
    fn rows(self) -> Result<Vec<(u32, String)>, String> {
        if self.records.is_empty() {
            return Ok(vec![]); // a skipped batch
        }
        if let Some(key) = std::env::var_os(POISON_KEY) {
            // Fault injection for the tests: a record that cannot be loaded.
            let key = key.to_string_lossy().into_owned();
            if self
                .records
                .iter()
                .any(|r| format!("{:?}", r.key).contains(&key))
            {
                return Err(format!(
                    "a record with key '{key}' cannot be loaded ({POISON_KEY})"
                ));
            }
        }
        // In-process connectors' records go straight to rows, checked against the schema.
        let decoded = avro::rows_of(&self.schema, self.records).map_err(|e| e.to_string())?;
        let empty = TableDef::default();
        let def = self.table.as_deref().unwrap_or(&empty);
        let (columns, compiled) = (&def.columns, &def.compiled);
        let (run, _) = runs(decoded.len(), self.partitions.len());
        decoded
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let p = self.partitions[(self.first_partition + i / run) % self.partitions.len()];
                let values = common::expr::build_row(r.topic, r.id, r.record, columns, compiled);
                // `to_string` writes into a Vec directly: half the time of `Value`'s Display,
                // the same text.
                serde_json::to_string(&Json::Array(values))
                    .map(|row| (p, row))
                    .map_err(|e| format!("cannot encode a row: {e}"))
            })
            .collect()
    }
}

pub(crate) enum RunError {
    Refused(String),
    Failed(String),
    /// A batch's load or commit failed (it can be skipped).
    BatchFailed {
        message: String,
        batch: Box<FailedBatch>,
    },
}
