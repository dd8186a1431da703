//! One task's loop: extract a batch, hand it to a job that loads and commits it while the
//! next is extracted, take in the outcome; retries, skips (STOP_ON_ERROR OFF) and resyncs
//! after a refusal.

use super::extract::{extract, Extracted};
use super::Assignment;
use crate::batch::{runs, BatchJob, FailedBatch, LastOffsets, Load, Outcome, RunError};
use crate::client::MasterClient;
use crate::commits::Committer;
use crate::store::{BatchKey, Store, TableRef};
use common::connect::{self, avro, CommittedOffsets, ConnectorConfig, TaskConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long a task whose batch was refused waits for a fresh assignment before it starts again
/// from the offsets it has.
const REFUSED_RESYNC: Duration = Duration::from_secs(1);

pub(super) struct Runner {
    pub(super) next_seq: u64,
    /// Batches this runner committed (retry budgets start again after each).
    pub(super) committed_batches: u64,
    pub(super) metrics: Arc<common::metrics::Metrics>,
    pub(super) store: Store,
    pub(super) client: MasterClient,
    pub(super) committer: Committer,
    pub(super) address: String,
    pub(super) assignment: watch::Receiver<Assignment>,
    pub(super) cancel: CancellationToken,
    /// The leaf's own shutdown: an unknown commit outcome is settled even after the task stops.
    pub(super) leaf_shutdown: CancellationToken,
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
    fn current(&self) -> Assignment {
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
    pub(super) async fn run(mut self) {
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
            table: None,
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
        let mut committed = a.offsets.clone();
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
                task.observe(&latest.offsets);
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
        a: &Assignment,
        schema: &Arc<avro::Schema>,
        batch: Extracted,
        committed: &CommittedOffsets,
        task: &dyn connect::SourceTask,
        next_partition: &mut usize,
    ) -> Result<(BatchJob, LastOffsets), RunError> {
        let table_def = a.columns.clone().map_err(RunError::Failed)?;
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
            table: Some(table_def),
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
