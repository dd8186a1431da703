//! Connector tasks on this leaf: the manager reconciles the tasks the master assigns (on
//! every heartbeat) with the running ones; each runner loops over batches:
//! poll -> Avro encode -> load (decode to rows) -> prepare -> commit at the master ->
//! finalize (or abort when refused).

use crate::client::{CallError, MasterClient};
use crate::store::{BatchKey, Store};
use common::connect::{self, avro, CommittedOffsets, ConnectorConfig, TaskConfig};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A table's columns and their compiled computed expressions, from the catalog's JSON.
pub fn table_columns(
    json: &str,
) -> Result<
    (
        Vec<common::catalog::tables::TableColumn>,
        Vec<Option<common::expr::Expr>>,
    ),
    String,
> {
    let columns: Vec<common::catalog::tables::TableColumn> =
        serde_json::from_str(json).map_err(|e| format!("bad table columns: {e}"))?;
    let compiled = common::expr::compile_table(&columns)?;
    Ok((columns, compiled))
}

/// Parses the `offsets_json` of an assignment.
pub fn parse_offsets(json: &str, start_override: &str) -> CommittedOffsets {
    let mut out = CommittedOffsets {
        start_override: (!start_override.is_empty()).then(|| start_override.to_string()),
        ..Default::default()
    };
    if let Ok(Json::Object(map)) = serde_json::from_str::<Json>(json) {
        for (k, v) in map {
            let finished = v.get("finished").and_then(Json::as_bool).unwrap_or(false);
            let value = v.get("value").cloned().unwrap_or(Json::Null);
            out.offsets.insert(k, (value, finished));
        }
    }
    out
}

struct Running {
    epoch: u64,
    assignment: watch::Sender<proto::TaskAssignment>,
    cancel: CancellationToken,
}

/// Runs the tasks assigned to this leaf.
pub struct TaskManager {
    store: Store,
    aggregators: Vec<String>,
    address: String,
    running: Mutex<HashMap<(u64, u32), Running>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    metrics: Arc<common::metrics::Metrics>,
}

impl TaskManager {
    pub fn new(
        store: Store,
        aggregators: Vec<String>,
        address: String,
        tasks: TaskTracker,
        shutdown: CancellationToken,
        metrics: Arc<common::metrics::Metrics>,
    ) -> Self {
        Self {
            store,
            aggregators,
            address,
            running: Mutex::new(HashMap::new()),
            tasks,
            shutdown,
            metrics,
        }
    }

    /// Resolves every batch left prepared by an earlier run: finalize if it committed,
    /// abort if not. Retries until the master answers (or shutdown).
    pub async fn recover(&self) {
        let batches = match self.store.prepared_batches() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("cannot read prepared batches: {e}");
                return;
            }
        };
        let mut client = MasterClient::new(self.aggregators.clone());
        for key in batches {
            if resolve(&self.store, &mut client, key, &self.shutdown)
                .await
                .is_none()
            {
                return;
            }
        }
    }

    /// Starts, updates and stops runners to match the master's assignments.
    pub async fn reconcile(&self, assignments: Vec<proto::TaskAssignment>) {
        let mut running = self.running.lock().await;
        let wanted: HashMap<(u64, u32), proto::TaskAssignment> = assignments
            .into_iter()
            .map(|a| ((a.pipeline_id, a.task_id), a))
            .collect();
        running.retain(|key, r| {
            let keep =
                wanted.get(key).is_some_and(|a| a.epoch == r.epoch) && !r.cancel.is_cancelled();
            if !keep {
                r.cancel.cancel();
            }
            keep
        });
        for (key, a) in wanted {
            if let Some(r) = running.get(&key) {
                r.assignment.send_if_modified(|cur| {
                    if *cur == a {
                        return false;
                    }
                    *cur = a.clone();
                    true
                });
                continue;
            }
            tracing::info!(pipeline = %a.pipeline, task = a.task_id, epoch = a.epoch, "starting task");
            let (tx, rx) = watch::channel(a.clone());
            let cancel = self.shutdown.child_token();
            running.insert(
                key,
                Running {
                    epoch: a.epoch,
                    assignment: tx,
                    cancel: cancel.clone(),
                },
            );
            let runner = Runner {
                // Unique per epoch even across restarts of this task or of the leaf: the master
                // recognises a retried commit by (epoch, seq).
                next_seq: now_ms().saturating_mul(1000),
                metrics: self.metrics.clone(),
                store: self.store.clone(),
                client: MasterClient::new(self.aggregators.clone()),
                address: self.address.clone(),
                assignment: rx,
                cancel,
                leaf_shutdown: self.shutdown.clone(),
            };
            self.tasks.spawn(runner.run());
        }
    }
}

/// Asks the master how a prepared batch ended and applies the answer. `None` on shutdown.
async fn resolve(
    store: &Store,
    client: &mut MasterClient,
    key: BatchKey,
    shutdown: &CancellationToken,
) -> Option<bool> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let req = proto::ResolveBatchRequest {
            pipeline_id: key.pipeline_id,
            task_id: key.task_id,
            epoch: key.epoch,
            seq: key.seq,
        };
        match client
            .call(|mut c| async move { c.resolve_batch(req).await })
            .await
        {
            Ok(r) => {
                let result = if r.committed {
                    store.finalize(key).map(|_| true)
                } else {
                    store.abort(key).map(|_| false)
                };
                match result {
                    Ok(committed) => {
                        tracing::info!(?key, committed, "resolved a prepared batch");
                        return Some(committed);
                    }
                    Err(e) => tracing::error!(?key, "cannot apply the batch outcome: {e}"),
                }
            }
            Err(e) => tracing::warn!(?key, "cannot resolve a prepared batch yet: {e}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

struct Runner {
    next_seq: u64,
    metrics: Arc<common::metrics::Metrics>,
    store: Store,
    client: MasterClient,
    address: String,
    assignment: watch::Receiver<proto::TaskAssignment>,
    cancel: CancellationToken,
    /// The leaf's own shutdown: an unknown commit outcome is settled even after the task stops.
    leaf_shutdown: CancellationToken,
}

/// How a batch attempt ended.
enum Outcome {
    /// Committed (or nothing to commit): go on.
    Continue,
    /// Refused by the master: this task's view is stale; stop and wait to be reassigned.
    Refused(String),
}

impl Runner {
    fn current(&self) -> proto::TaskAssignment {
        self.assignment.borrow().clone()
    }

    async fn report(&mut self, message: &str, fatal: bool) {
        let a = self.current();
        let (host, port) = self
            .address
            .rsplit_once(':')
            .map_or((self.address.clone(), 0), |(h, p)| {
                (h.to_string(), p.parse().unwrap_or(0))
            });
        let req = proto::TaskErrorRequest {
            pipeline_id: a.pipeline_id,
            task_id: a.task_id,
            epoch: a.epoch,
            message: format!("LEAF ERROR ({}): {message}", self.address),
            fatal,
            host,
            port,
            partition: String::new(),
        };
        if let Err(e) = self
            .client
            .call(|mut c| {
                let req = req.clone();
                async move { c.report_task_error(req).await }
            })
            .await
        {
            tracing::warn!("cannot report a task error: {e}");
        }
    }

    async fn run(mut self) {
        let a = self.current();
        let mut failures: u32 = 0;
        loop {
            let result = self.run_once().await;
            if self.cancel.is_cancelled() {
                return;
            }
            match result {
                Ok(()) => return,
                Err(RunError::Refused(reason)) => {
                    tracing::info!(pipeline = %a.pipeline, task = a.task_id, "batch refused ({reason}); waiting for a new assignment");
                    // Stay out of the way until the master reassigns (new epoch) or stops us.
                    self.cancel.cancelled().await;
                    return;
                }
                Err(RunError::Failed(msg)) => {
                    failures += 1;
                    let max = self.current().max_retries;
                    let fatal = failures > max;
                    tracing::warn!(pipeline = %a.pipeline, task = a.task_id, attempt = failures, fatal, "task failed: {msg}");
                    self.report(&msg, fatal).await;
                    if fatal {
                        self.cancel.cancelled().await;
                        return;
                    }
                    let backoff = Duration::from_millis(500 * (1u64 << (failures - 1).min(5)));
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
    }

    /// Starts the connector task and runs batches until cancelled or failed.
    async fn run_once(&mut self) -> Result<(), RunError> {
        let a = self.current();
        let config: ConnectorConfig = serde_json::from_str(&a.config_json)
            .map_err(|e| RunError::Failed(format!("bad pipeline config: {e}")))?;
        let task_config: TaskConfig = serde_json::from_str(&a.task_config_json)
            .map_err(|e| RunError::Failed(format!("bad task config: {e}")))?;
        let class = connect::required(&config, "connector.class")
            .map_err(|e| RunError::Failed(e.to_string()))?;
        let connector = connect::connector(&class).map_err(|e| RunError::Failed(e.to_string()))?;
        let schema = avro::envelope_schema(connector.key_schema(), connector.value_schema())
            .map_err(|e| RunError::Failed(e.to_string()))?;
        let mut committed = parse_offsets(&a.offsets_json, &a.start_override);
        let mut task = connector.task();
        tokio::select! {
            _ = self.cancel.cancelled() => return Ok(()),
            r = task.start(&config, &task_config, &committed) => r.map_err(|e| RunError::Failed(e.to_string()))?,
        }
        let mut next_partition = 0usize;
        loop {
            if self.cancel.is_cancelled() {
                return Ok(());
            }
            if self.assignment.has_changed().unwrap_or(false) {
                let latest = self.assignment.borrow_and_update().clone();
                task.observe(&parse_offsets(&latest.offsets_json, &latest.start_override));
            }
            let a = self.current();
            let batch_size = a.batch_size.max(1) as usize;
            let start = Instant::now();
            let start_ms = now_ms();
            let deadline = start + Duration::from_millis(a.max_batch_interval_ms.max(1));
            let mut records = Vec::new();
            let mut finished = Vec::new();
            while records.len() < batch_size {
                let poll = tokio::select! {
                    _ = self.cancel.cancelled() => return Ok(()),
                    p = task.poll(batch_size - records.len(), deadline) => p.map_err(|e| RunError::Failed(e.to_string()))?,
                };
                let ended = !poll.finished.is_empty();
                for (partition, ms) in &poll.lag_ms {
                    self.metrics.set(
                        &format!(
                            "shardline_source_lag_millis{{pipeline=\"{}\",partition=\"{}\"}}",
                            common::metrics::label(&a.pipeline),
                            common::metrics::label(partition)
                        ),
                        *ms as f64,
                    );
                }
                records.extend(poll.records);
                finished.extend(poll.finished);
                if Instant::now() >= deadline || ended {
                    break;
                }
            }
            let extract_ms = start.elapsed().as_millis() as u64;
            if records.is_empty() && finished.is_empty() {
                // Nothing found: wait BATCH_INTERVAL before the next batch.
                tokio::select! {
                    _ = self.cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(a.batch_interval_ms)) => {}
                }
                continue;
            }
            // FORMAT AVRO: the batch travels as Avro; the loader decodes it into rows.
            let bytes = avro::encode_batch(&schema, &records)
                .map_err(|e| RunError::Failed(e.to_string()))?;
            let rows = avro::decode_batch(&bytes).map_err(|e| RunError::Failed(e.to_string()))?;
            if a.partitions.is_empty() {
                return Err(RunError::Failed(format!(
                    "this leaf holds no partition of database '{}'",
                    a.database
                )));
            }
            // The loader: static columns from the record, computed ones evaluated here.
            let (columns, compiled) = if a.columns_json.is_empty() {
                (vec![], vec![])
            } else {
                table_columns(&a.columns_json).map_err(RunError::Failed)?
            };
            let mut used = std::collections::BTreeSet::new();
            let rows: Vec<(u32, String)> = rows
                .into_iter()
                .map(|r| {
                    let p = a.partitions[next_partition % a.partitions.len()];
                    next_partition += 1;
                    used.insert(p);
                    let values =
                        common::expr::build_row(r.topic, r.id, r.record, &columns, &compiled);
                    (p, Json::Array(values).to_string())
                })
                .collect();
            // Offsets: per source partition, from the committed offset to the last record.
            let mut last: std::collections::BTreeMap<String, (Json, bool)> = Default::default();
            for r in &records {
                last.insert(r.source_partition.clone(), (r.source_offset.clone(), false));
            }
            for (p, v) in finished {
                last.insert(p, (v, true));
            }
            let offsets: Vec<common::catalog::pipelines::OffsetUpdate> = last
                .iter()
                .map(|(k, (to, fin))| common::catalog::pipelines::OffsetUpdate {
                    key: k.clone(),
                    from: committed.value(k).cloned(),
                    to: to.clone(),
                    finished: *fin,
                })
                .collect();
            self.next_seq += 1;
            let seq = self.next_seq;
            let key = BatchKey {
                pipeline_id: a.pipeline_id,
                task_id: a.task_id,
                epoch: a.epoch,
                seq,
            };
            self.store
                .prepare(key, &a.database, &a.table, &rows)
                .await
                .map_err(|e| RunError::Failed(e.to_string()))?;
            let commit = common::catalog::pipelines::BatchCommit {
                pipeline_id: a.pipeline_id,
                task_id: a.task_id,
                epoch: a.epoch,
                seq,
                offsets,
                start_ms,
                extractor_wait_ms: extract_ms,
                batch_time_ms: start.elapsed().as_millis() as u64,
                rows: rows.len() as u64,
                bytes: records.iter().map(|r| r.size as u64).sum(),
                num_partitions: used.len() as u32,
            };
            let (rows_n, bytes_n) = (commit.rows, commit.bytes);
            let committing = Instant::now();
            let label = format!("{{pipeline=\"{}\"}}", common::metrics::label(&a.pipeline));
            match self.commit(key, commit).await? {
                Outcome::Continue => {
                    let m = &self.metrics;
                    m.add(
                        &format!("shardline_rows_loaded_total{label}"),
                        rows_n as f64,
                    );
                    m.add(
                        &format!("shardline_bytes_loaded_total{label}"),
                        bytes_n as f64,
                    );
                    m.add(&format!("shardline_batches_committed_total{label}"), 1.0);
                    m.add(
                        &format!("shardline_commit_seconds_sum{label}"),
                        committing.elapsed().as_secs_f64(),
                    );
                    m.add(&format!("shardline_commit_seconds_count{label}"), 1.0);
                    for (k, v) in last {
                        committed.offsets.insert(k, v);
                    }
                    task.commit(&committed);
                }
                Outcome::Refused(reason) => {
                    self.metrics
                        .add(&format!("shardline_batches_failed_total{label}"), 1.0);
                    return Err(RunError::Refused(reason));
                }
            }
        }
    }

    /// Commits a prepared batch at the master, retrying while the answer is unknown.
    async fn commit(
        &mut self,
        key: BatchKey,
        batch: common::catalog::pipelines::BatchCommit,
    ) -> Result<Outcome, RunError> {
        let body = serde_json::to_vec(&batch).map_err(|e| RunError::Failed(e.to_string()))?;
        let mut backoff = Duration::from_millis(50);
        loop {
            let req = proto::CommitBatchRequest {
                batch_json: body.clone(),
            };
            match self
                .client
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.commit_batch(req).await }
                })
                .await
            {
                Ok(r) if r.committed => {
                    self.store
                        .finalize(key)
                        .map_err(|e| RunError::Failed(e.to_string()))?;
                    tracing::debug!(
                        ?key,
                        batch_id = r.batch_id,
                        rows = batch.rows,
                        "batch committed"
                    );
                    return Ok(Outcome::Continue);
                }
                Ok(r) => {
                    self.store
                        .abort(key)
                        .map_err(|e| RunError::Failed(e.to_string()))?;
                    return Ok(Outcome::Refused(r.reason));
                }
                Err(CallError::Rejected(status))
                    if status.code() == tonic::Code::InvalidArgument =>
                {
                    self.store
                        .abort(key)
                        .map_err(|e| RunError::Failed(e.to_string()))?;
                    return Err(RunError::Failed(format!(
                        "commit refused: {}",
                        status.message()
                    )));
                }
                Err(e) => {
                    tracing::debug!(?key, "commit outcome unknown, retrying: {e}");
                }
            }
            if self.cancel.is_cancelled() {
                // We are being stopped with the outcome unknown: settle it for good.
                match resolve(
                    &self.store,
                    &mut self.client,
                    key,
                    &self.leaf_shutdown.clone(),
                )
                .await
                {
                    Some(true) => return Ok(Outcome::Continue),
                    _ => return Ok(Outcome::Refused("stopped".into())),
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

enum RunError {
    Refused(String),
    Failed(String),
}

/// Extracts up to `limit` records without loading them (TEST PIPELINE): rows [topic, id, record].
pub async fn test_extract(
    config_json: &str,
    offsets_json: &str,
    limit: usize,
) -> Result<Vec<String>, String> {
    let config: ConnectorConfig =
        serde_json::from_str(config_json).map_err(|e| format!("bad config: {e}"))?;
    let class = connect::required(&config, "connector.class").map_err(|e| e.to_string())?;
    let connector = connect::connector(&class).map_err(|e| e.to_string())?;
    let tasks = connector
        .task_configs(&config, 1)
        .await
        .map_err(|e| e.to_string())?;
    let offsets = parse_offsets(offsets_json, "");
    let schema = avro::envelope_schema(connector.key_schema(), connector.value_schema())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for tc in tasks {
        let mut task = connector.task();
        task.start(&config, &tc, &offsets)
            .await
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut records = Vec::new();
        while records.len() < limit && Instant::now() < deadline {
            let p = task
                .poll(limit - records.len(), deadline)
                .await
                .map_err(|e| e.to_string())?;
            records.extend(p.records);
        }
        let bytes = avro::encode_batch(&schema, &records).map_err(|e| e.to_string())?;
        for r in avro::decode_batch(&bytes).map_err(|e| e.to_string())? {
            out.push(serde_json::json!([r.topic, r.id, r.record]).to_string());
        }
        if out.len() >= limit {
            break;
        }
    }
    out.truncate(limit);
    Ok(out)
}

/// Shared handle.
pub type Tasks = Arc<TaskManager>;
