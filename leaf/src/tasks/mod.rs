//! Connector tasks on this leaf: the manager reconciles the tasks the master assigns (on
//! every heartbeat) with the running ones; each runner loops over batches:
//! poll -> Avro encode -> load (decode to rows) -> prepare -> commit at the master ->
//! finalize (or abort when refused).
//!
//! - [`assignment`]: the task as the master assigned it, read from its wire form once;
//! - [`extract`]: polling the source for one batch;
//! - [`runner`]: one task's loop of batches, its retries, skips and resyncs;
//! - [`test_extract`]: TEST PIPELINE (records extracted, not loaded).

mod assignment;
mod extract;
mod runner;
mod test_extract;

pub use assignment::{committed_offsets, Assignment, TableDef};
pub use test_extract::test_extract;

use crate::client::MasterClient;
use crate::commits::Committer;
use crate::store::{BatchKey, Store};
use runner::Runner;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Running {
    epoch: u64,
    /// The wire form last sent to the runner, to see whether a heartbeat changed it.
    last: proto::TaskAssignment,
    assignment: watch::Sender<Assignment>,
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
            if let Some(r) = running.get_mut(&key) {
                if r.last != a {
                    r.assignment.send_replace(Assignment::from_proto(&a));
                    r.last = a;
                }
                continue;
            }
            tracing::info!(
                pipeline = %a.pipeline,
                pipeline_id = a.pipeline_id,
                task = a.task_id,
                epoch = a.epoch,
                "starting task"
            );
            let (tx, rx) = watch::channel(Assignment::from_proto(&a));
            let cancel = self.shutdown.child_token();
            running.insert(
                key,
                Running {
                    epoch: a.epoch,
                    last: a,
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

/// Shared handle.
pub type Tasks = Arc<TaskManager>;
