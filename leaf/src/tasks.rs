//! Connector tasks on this leaf: the manager reconciles the tasks the master assigns (on
//! every heartbeat) with the running ones; each runner loops over batches:
//! poll -> Avro encode -> load (decode to rows) -> prepare -> commit at the master ->
//! finalize (or abort when refused).

use crate::batch::{runs, BatchJob, FailedBatch, LastOffsets, Load, Outcome, RunError};
use crate::client::MasterClient;
use crate::commits::Committer;
use crate::store::{BatchKey, Store, TableRef};
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

/// The committed offsets and start position an assignment carries.
pub fn assigned_offsets(a: &proto::TaskAssignment) -> CommittedOffsets {
    CommittedOffsets {
        start_override: (!a.start_override.is_empty()).then(|| a.start_override.clone()),
        start_at_ms: (a.start_at_ms != 0).then_some(a.start_at_ms),
        ..parse_offsets(&a.offsets_json)
    }
}

/// Parses the `offsets_json` of an assignment.
pub fn parse_offsets(json: &str) -> CommittedOffsets {
    let mut out = CommittedOffsets::default();
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
    aggregators: crate::client::AggregatorList,
    address: String,
    running: Mutex<HashMap<(u64, u32), Running>>,
    /// The committed offsets the master sent, per pipeline (heartbeats carry only changes).
    offsets: std::sync::Mutex<crate::offsets::OffsetCache>,
    /// Shared by every task: their batch commits travel to the master together.
    committer: Committer,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    metrics: Arc<common::metrics::Metrics>,
}

impl TaskManager {
    /// Must be called within a Tokio runtime (it starts the committer).
    pub fn new(
        store: Store,
        aggregators: crate::client::AggregatorList,
        address: String,
        tasks: TaskTracker,
        shutdown: CancellationToken,
        metrics: Arc<common::metrics::Metrics>,
    ) -> Self {
        let committer = Committer::start(
            MasterClient::new(aggregators.clone()),
            crate::commits::CALLS_IN_FLIGHT,
            crate::commits::MAX_BATCHES_PER_CALL,
        );
        Self {
            store,
            aggregators,
            address,
            running: Mutex::new(HashMap::new()),
            offsets: Default::default(),
            committer,
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

    pub fn metrics(&self) -> &common::metrics::Metrics {
        &self.metrics
    }

    /// What this leaf holds of each pipeline's committed offsets (for the next heartbeat).
    pub fn offsets_seen(&self) -> Vec<proto::OffsetsSeen> {
        self.offsets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen()
    }

    /// Starts, updates and stops runners to match the master's assignments.
    pub async fn reconcile(&self, mut assignments: Vec<proto::TaskAssignment>) {
        self.offsets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .merge(&mut assignments);
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
            tracing::info!(
                pipeline = %a.pipeline,
                pipeline_id = a.pipeline_id,
                task = a.task_id,
                epoch = a.epoch,
                "starting task"
            );
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
                committed_batches: 0,
                metrics: self.metrics.clone(),
                store: self.store.clone(),
                client: MasterClient::new(self.aggregators.clone()),
                committer: self.committer.clone(),
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
pub(crate) async fn resolve(
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

/// How long a task whose batch was refused waits for a fresh assignment before it starts again
/// from the offsets it has.
const REFUSED_RESYNC: Duration = Duration::from_secs(1);

struct Runner {
    next_seq: u64,
    /// Batches this runner committed (retry budgets start again after each).
    committed_batches: u64,
    metrics: Arc<common::metrics::Metrics>,
    store: Store,
    client: MasterClient,
    committer: Committer,
    address: String,
    assignment: watch::Receiver<proto::TaskAssignment>,
    cancel: CancellationToken,
    /// The leaf's own shutdown: an unknown commit outcome is settled even after the task stops.
    leaf_shutdown: CancellationToken,
}

/// Records taken from the source for one batch.
struct Extracted {
    records: Vec<connect::SourceRecord>,
    /// Source partitions that ended, with their last offset.
    finished: Vec<(String, Json)>,
    start: Instant,
    start_ms: u64,
    extract_ms: u64,
}

impl Extracted {
    fn is_empty(&self) -> bool {
        self.records.is_empty() && self.finished.is_empty()
    }
}

/// Polls the task for one batch: until `batch_size` records, until
/// `max_batch_interval_ms` elapsed, until a source partition ended, or, once it holds records,
/// until the source has nothing more to give right away or the batch before it (`loading`)
/// has been loaded and committed. A batch does not sit on rows it already has while the loader
/// is idle: under a slow source batches are what one poll brings and rows are visible a poll
/// after they are read; when loading is the slower side, batches grow up to `batch_size`.
/// `None` when cancelled.
async fn extract(
    task: &mut dyn connect::SourceTask,
    a: &proto::TaskAssignment,
    metrics: &common::metrics::Metrics,
    cancel: &CancellationToken,
    loading: Option<&tokio::task::JoinHandle<Result<Outcome, RunError>>>,
) -> Result<Option<Extracted>, RunError> {
    let batch_size = a.batch_size.max(1) as usize;
    let start = Instant::now();
    let start_ms = now_ms();
    let deadline = start + Duration::from_millis(a.max_batch_interval_ms.max(1));
    let mut records = Vec::new();
    let mut finished = Vec::new();
    while records.len() < batch_size {
        // With records in hand, only what is available now.
        let until = if records.is_empty() {
            deadline
        } else {
            Instant::now().min(deadline)
        };
        let poll = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            p = task.poll(batch_size - records.len(), until) => p.map_err(|e| RunError::Failed(e.to_string()))?,
        };
        for (partition, ms) in &poll.lag_ms {
            metrics.set(
                &format!(
                    "shardline_source_lag_millis{{pipeline=\"{}\",partition=\"{}\"}}",
                    common::metrics::label(&a.pipeline),
                    common::metrics::label(partition)
                ),
                *ms as f64,
            );
        }
        let ended = !poll.finished.is_empty();
        let drained = !records.is_empty() && poll.records.is_empty();
        records.extend(poll.records);
        finished.extend(poll.finished);
        let loader_idle = !records.is_empty() && loading.is_none_or(|h| h.is_finished());
        if ended || drained || loader_idle || Instant::now() >= deadline {
            break;
        }
    }
    Ok(Some(Extracted {
        records,
        finished,
        start,
        start_ms,
        extract_ms: start.elapsed().as_millis() as u64,
    }))
}

/// The batch being loaded and committed while the next one is extracted, with the offsets it
/// moves to.
struct InFlight {
    handle: tokio::task::JoinHandle<Result<Outcome, RunError>>,
    last: LastOffsets,
    /// What skipping the batch commits, should it fail for good.
    skip: FailedBatch,
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

    /// Runs the task until it is cancelled (stopped, moved, or the pipeline failed). It never
    /// parks: a refused batch resyncs from the committed offsets, and a failing batch is
    /// retried up to MAX_RETRIES_PER_BATCH_PARTITION times (the count starts again with every
    /// batch that commits), then reported as fatal, which moves the pipeline to Error (the
    /// master then stops this task) or, with STOP_ON_ERROR OFF, skips it and goes on.
    async fn run(mut self) {
        let a = self.current();
        let mut failures: u32 = 0;
        let mut committed_before = self.committed_batches;
        loop {
            let result = self.run_once().await;
            if self.cancel.is_cancelled() {
                return;
            }
            if self.committed_batches != committed_before {
                // A batch went through since the last failure: the next one has its own budget.
                committed_before = self.committed_batches;
                failures = 0;
            }
            match result {
                Ok(()) => return,
                Err(RunError::Refused(reason)) => {
                    // The offsets this run started from are not the committed ones (an old
                    // assignment after a failover or a restart): start again from the master's.
                    tracing::info!(pipeline = %a.pipeline, task = a.task_id, "batch refused ({reason}); resyncing from the committed offsets");
                    self.metrics.add("shardline_batches_refused_total", 1.0);
                    if !self.await_new_assignment(REFUSED_RESYNC).await {
                        return;
                    }
                }
                Err(e @ (RunError::Failed(_) | RunError::BatchFailed { .. })) => {
                    let (msg, batch) = match e {
                        RunError::BatchFailed { message, batch } => (message, Some(batch)),
                        RunError::Failed(message) => (message, None),
                        RunError::Refused(message) => (message, None),
                    };
                    failures += 1;
                    let current = self.current();
                    let fatal = failures > current.max_retries;
                    tracing::warn!(pipeline = %a.pipeline, task = a.task_id, attempt = failures, fatal, "task failed: {msg}");
                    self.report(&msg, fatal).await;
                    let backoff = Duration::from_millis(500 * (1u64 << (failures - 1).min(5)));
                    if fatal {
                        // Reported as the batch's last failure: the master stops the pipeline
                        // (STOP_ON_ERROR ON: this task is cancelled) or counts the batch as
                        // skipped. A skipped batch that holds records moves its offsets past
                        // them without loading them (a failure before any record was read
                        // skips nothing). The next batch starts with a budget of its own.
                        failures = 0;
                        if let (Some(batch), false) = (batch, current.stop_on_error) {
                            self.skip(*batch).await;
                        }
                    }
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
    }

    /// Commits a failed batch's offsets without its rows (STOP_ON_ERROR OFF, retries
    /// exhausted), as one batch of no rows through the usual prepare, commit and finalize. If it
    /// does not commit (refused: the task moved, or its offsets did), the next run starts from
    /// the committed offsets as after any refusal.
    async fn skip(&mut self, batch: FailedBatch) {
        let a = self.current();
        self.next_seq += 1;
        let key = BatchKey {
            pipeline_id: batch.commit.pipeline_id,
            task_id: batch.commit.task_id,
            epoch: batch.commit.epoch,
            seq: self.next_seq,
        };
        let commit = common::catalog::pipelines::BatchCommit {
            seq: key.seq,
            rows: 0,
            bytes: 0,
            num_partitions: 0,
            ..batch.commit
        };
        let no_rows = Load {
            schema: Arc::new(avro::Schema::Null),
            records: vec![],
            columns_json: String::new(),
            partitions: vec![],
            first_partition: 0,
        };
        let job = self.job(key, Instant::now(), batch.table, no_rows, commit);
        match job.run().await {
            Ok(Outcome::Continue) => {
                tracing::warn!(pipeline = %a.pipeline, task = a.task_id, offsets = ?batch.last, "skipped a batch that failed past its retries (STOP_ON_ERROR OFF)");
                self.count_skipped();
                self.committed_batches += 1;
            }
            Ok(Outcome::Refused(reason)) => {
                tracing::info!(pipeline = %a.pipeline, task = a.task_id, "the skipped batch was refused ({reason})");
            }
            Err(_) => {
                tracing::warn!(pipeline = %a.pipeline, task = a.task_id, "cannot commit the skipped batch yet");
            }
        }
    }

    fn count_skipped(&self) {
        let label = common::metrics::label(&self.current().pipeline);
        self.metrics.add(
            &format!("shardline_batches_skipped_total{{pipeline=\"{label}\"}}"),
            1.0,
        );
    }

    /// Waits until the master sends this task's assignment again (a heartbeat: it carries the
    /// committed offsets as the master has them now), or `at_most`. `false` when cancelled.
    async fn await_new_assignment(&mut self, at_most: Duration) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = self.assignment.changed() => true,
            _ = tokio::time::sleep(at_most) => true,
        }
    }

    /// Waits for the batch in flight and takes in its outcome: the committed offsets move on,
    /// a refusal or failure ends this run.
    async fn settle(
        &mut self,
        in_flight: InFlight,
        committed: &mut CommittedOffsets,
        task: &mut dyn connect::SourceTask,
    ) -> Result<(), RunError> {
        let failed = |message: String, skip: FailedBatch| RunError::BatchFailed {
            message,
            batch: Box::new(skip),
        };
        let outcome = match in_flight.handle.await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(RunError::Failed(message))) => return Err(failed(message, in_flight.skip)),
            Ok(Err(other)) => return Err(other),
            Err(e) => return Err(failed(format!("batch loader stopped: {e}"), in_flight.skip)),
        };
        match outcome {
            Outcome::Continue => {
                committed.offsets.extend(in_flight.last);
                task.commit(committed);
                self.committed_batches += 1;
                Ok(())
            }
            Outcome::Refused(reason) => Err(RunError::Refused(reason)),
        }
    }

    /// Starts the connector task and runs batches until cancelled or failed. Batch N+1 is
    /// extracted while batch N is loaded and committed; N+1's offsets start where N's end, and
    /// it is prepared only once N committed.
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
            .map(Arc::new)
            .map_err(|e| RunError::Failed(e.to_string()))?;
        let mut committed = assigned_offsets(&a);
        let mut task = connector.task();
        tokio::select! {
            _ = self.cancel.cancelled() => return Ok(()),
            r = task.start(&config, &task_config, &committed) => r.map_err(|e| RunError::Failed(e.to_string()))?,
        }
        let mut next_partition = 0usize;
        let mut in_flight: Option<InFlight> = None;
        loop {
            if self.assignment.has_changed().unwrap_or(false) {
                let latest = self.assignment.borrow_and_update().clone();
                task.observe(&assigned_offsets(&latest));
            }
            let a = self.current();
            let loading = in_flight.as_ref().map(|f| &f.handle);
            let extracted = extract(task.as_mut(), &a, &self.metrics, &self.cancel, loading).await;
            if let Some(f) = in_flight.take() {
                self.settle(f, &mut committed, task.as_mut()).await?;
                if crate::batch::stale_offsets_due(self.committed_batches) {
                    tracing::warn!(
                        "{} is set: forgetting this task's commits once",
                        crate::batch::STALE_OFFSETS_ONCE
                    );
                    committed.offsets.clear();
                    tokio::select! {
                        _ = self.cancel.cancelled() => return Ok(()),
                        r = task.start(&config, &task_config, &committed) => r.map_err(|e| RunError::Failed(e.to_string()))?,
                    }
                    continue;
                }
            }
            let Some(batch) = extracted? else {
                return Ok(()); // cancelled
            };
            if batch.is_empty() {
                // Nothing found: wait BATCH_INTERVAL before the next batch.
                tokio::select! {
                    _ = self.cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(a.batch_interval_ms)) => {}
                }
                continue;
            }
            if self.cancel.is_cancelled() {
                return Ok(());
            }
            let (job, last) =
                self.batch_job(&a, &schema, batch, &committed, &*task, &mut next_partition)?;
            let skip = FailedBatch {
                commit: job.commit.clone(),
                table: job.table.clone(),
                last: last.clone(),
            };
            in_flight = Some(InFlight {
                handle: tokio::spawn(job.run()),
                last,
                skip,
            });
        }
    }

    /// Turns an extracted batch into a job that loads and commits it: the offsets from the
    /// committed ones to each source partition's last record, the batch's key and commit, and
    /// its records, which the job turns into rows away from this extraction loop.
    fn batch_job(
        &mut self,
        a: &proto::TaskAssignment,
        schema: &Arc<avro::Schema>,
        batch: Extracted,
        committed: &CommittedOffsets,
        task: &dyn connect::SourceTask,
        next_partition: &mut usize,
    ) -> Result<(BatchJob, LastOffsets), RunError> {
        if a.partitions.is_empty() {
            return Err(RunError::Failed(format!(
                "this leaf holds no partition of database '{}'",
                a.database
            )));
        }
        let mut last = LastOffsets::new();
        for r in &batch.records {
            last.insert(r.source_partition.clone(), (r.source_offset.clone(), false));
        }
        for (p, v) in batch.finished {
            last.insert(p, (v, true));
        }
        let offsets = last
            .iter()
            .map(|(k, (to, fin))| {
                let from = committed.value(k).cloned();
                let continues = if from.is_none() {
                    task.continues(k)
                } else {
                    Vec::new()
                };
                common::catalog::pipelines::OffsetUpdate {
                    key: k.clone(),
                    from,
                    to: to.clone(),
                    finished: *fin,
                    continues,
                }
            })
            .collect();
        // The records go to the leaf's partitions in equal runs (each run stored as row
        // groups), the first run where the last batch stopped.
        let first_partition = *next_partition;
        let (_, used) = runs(batch.records.len(), a.partitions.len());
        *next_partition += used;
        self.next_seq += 1;
        let key = BatchKey {
            pipeline_id: a.pipeline_id,
            task_id: a.task_id,
            epoch: a.epoch,
            seq: self.next_seq,
        };
        let commit = common::catalog::pipelines::BatchCommit {
            pipeline_id: a.pipeline_id,
            task_id: a.task_id,
            epoch: a.epoch,
            seq: key.seq,
            offsets,
            start_ms: batch.start_ms,
            extractor_wait_ms: batch.extract_ms,
            batch_time_ms: 0, // set once prepared
            rows: batch.records.len() as u64,
            bytes: batch.records.iter().map(|r| r.size as u64).sum(),
            num_partitions: used as u32,
        };
        let load = Load {
            schema: schema.clone(),
            records: batch.records,
            columns_json: a.columns_json.clone(),
            partitions: a.partitions.clone(),
            first_partition,
        };
        let table = TableRef::new(a.table_id, &a.database, &a.table);
        Ok((self.job(key, batch.start, table, load, commit), last))
    }

    /// A job for one batch of this task.
    fn job(
        &self,
        key: BatchKey,
        start: Instant,
        table: TableRef,
        load: Load,
        commit: common::catalog::pipelines::BatchCommit,
    ) -> BatchJob {
        BatchJob {
            key,
            start,
            table,
            load: Some(load),
            commit,
            pipeline: self.current().pipeline,
            store: self.store.clone(),
            client: self.client.clone(),
            committer: self.committer.clone(),
            metrics: self.metrics.clone(),
            cancel: self.cancel.clone(),
            leaf_shutdown: self.leaf_shutdown.clone(),
        }
    }
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
    let offsets = parse_offsets(offsets_json);
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
        let bytes = avro::encode_batch(&schema, records).map_err(|e| e.to_string())?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use common::connect::{Poll, SourceRecord, SourceTask};

    /// A source that hands out `ready` records on its first poll and nothing after, noting
    /// each poll's deadline and when it was called.
    struct Scripted {
        ready: usize,
        /// Records one poll gives at most.
        chunk: usize,
        polls: Vec<(Instant, Instant)>,
    }

    #[async_trait::async_trait]
    impl SourceTask for Scripted {
        async fn start(
            &mut self,
            _: &ConnectorConfig,
            _: &TaskConfig,
            _: &CommittedOffsets,
        ) -> Result<(), connect::ConnectError> {
            Ok(())
        }

        async fn poll(
            &mut self,
            max_records: usize,
            deadline: Instant,
        ) -> Result<Poll, connect::ConnectError> {
            self.polls.push((Instant::now(), deadline));
            assert!(self.polls.len() < 10, "polled on after the source ran dry");
            let n = self.ready.min(max_records).min(self.chunk);
            self.ready -= n;
            let records = (0..n)
                .map(|i| SourceRecord {
                    topic: "t".into(),
                    key: avro::Value::Null,
                    value: avro::Value::Null,
                    source_partition: "p".into(),
                    source_offset: serde_json::json!(i),
                    size: 1,
                })
                .collect();
            Ok(Poll {
                records,
                ..Default::default()
            })
        }

        fn commit(&mut self, _: &CommittedOffsets) {}

        fn observe(&mut self, _: &CommittedOffsets) {}
    }

    fn assignment(batch_size: u64) -> proto::TaskAssignment {
        proto::TaskAssignment {
            batch_size,
            max_batch_interval_ms: 3_600_000,
            ..Default::default()
        }
    }

    type Loading = tokio::task::JoinHandle<Result<Outcome, RunError>>;

    /// A batch still loading (never done).
    fn busy_loader() -> Loading {
        tokio::spawn(std::future::pending())
    }

    /// A batch loaded and committed.
    async fn idle_loader() -> Loading {
        let h = tokio::spawn(async { Ok(Outcome::Continue) });
        while !h.is_finished() {
            tokio::task::yield_now().await;
        }
        h
    }

    /// One batch extracted from a source holding `ready` records, `chunk` at most per poll,
    /// beside `loading`, and the source after it.
    async fn extract_beside(
        ready: usize,
        chunk: usize,
        batch_size: u64,
        loading: Option<&Loading>,
    ) -> (Extracted, Scripted) {
        let mut task = Scripted {
            ready,
            chunk,
            polls: vec![],
        };
        let metrics = common::metrics::Metrics::default();
        let batch = extract(
            &mut task,
            &assignment(batch_size),
            &metrics,
            &CancellationToken::new(),
            loading,
        )
        .await
        .ok()
        .flatten()
        .expect("a batch");
        (batch, task)
    }

    /// One batch extracted from a source holding `ready` records while the batch before it is
    /// still loading, and the source after it.
    async fn extract_from(ready: usize, batch_size: u64) -> (Extracted, Scripted) {
        let loading = busy_loader();
        let out = extract_beside(ready, usize::MAX, batch_size, Some(&loading)).await;
        loading.abort();
        out
    }

    #[tokio::test]
    async fn with_the_loader_idle_a_batch_is_what_one_poll_brings() {
        for loading in [None, Some(idle_loader().await)] {
            let (batch, task) = extract_beside(100, 7, 50, loading.as_ref()).await;
            assert_eq!(batch.records.len(), 7, "the first poll's records, no more");
            assert_eq!(task.polls.len(), 1);
        }
    }

    #[tokio::test]
    async fn while_the_last_batch_loads_the_next_one_grows() {
        let loading = busy_loader();
        let (batch, task) = extract_beside(100, 7, 50, Some(&loading)).await;
        loading.abort();
        assert_eq!(batch.records.len(), 50, "polled on up to the batch size");
        assert_eq!(task.polls.len(), 8);
    }

    #[tokio::test]
    async fn a_batch_ends_once_the_source_has_nothing_more_right_now() {
        let (batch, task) = extract_from(3, 100).await;
        assert_eq!(batch.records.len(), 3);
        assert_eq!(
            task.polls.len(),
            2,
            "one poll that found records, one that found none"
        );
        let (called, deadline) = task.polls[1];
        assert!(
            deadline <= called,
            "with records in hand, the source is asked only for what it has now"
        );
    }

    #[tokio::test]
    async fn a_full_batch_ends_without_asking_for_more() {
        let (batch, task) = extract_from(10, 4).await;
        assert_eq!(batch.records.len(), 4);
        assert_eq!(task.polls.len(), 1);
    }

    #[test]
    fn records_split_into_equal_runs_over_the_partitions() {
        assert_eq!(runs(600, 2), (300, 2));
        assert_eq!(runs(8, 4), (2, 4));
        assert_eq!(
            runs(5, 4),
            (2, 3),
            "runs of 2: the fourth partition gets none"
        );
        assert_eq!(runs(1, 4), (1, 1));
        assert_eq!(runs(0, 4).1, 0);
    }
}
