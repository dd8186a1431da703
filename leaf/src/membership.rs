//! Registration with the cluster and heartbeats to the master aggregator.
//!
//! The leaf registers by its advertised address (the cluster gives a returning leaf its old
//! id), then heartbeats every interval. Unreachable aggregators are retried with backoff and
//! the reason is logged once per outage. The master wakes a leaf whose tasks it changed, so it
//! learns them at once rather than at its next beat.

use crate::client::{CallError, MasterClient};
use crate::config::LeafConfig;
use crate::store::{LiveView, Store};
use crate::tasks::TaskManager;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The leaf's standing in the cluster.
#[derive(Default)]
pub struct Membership {
    /// 0 until registered.
    leaf_id: AtomicU64,
    /// The last call to the master succeeded.
    reachable: AtomicBool,
    /// Heartbeat now: the master changed this leaf's tasks.
    wake: tokio::sync::Notify,
    /// The batches an earlier run left prepared are settled: scans are complete.
    recovered: AtomicBool,
}

impl Membership {
    pub fn leaf_id(&self) -> Option<u64> {
        match self.leaf_id.load(Ordering::Relaxed) {
            0 => None,
            id => Some(id),
        }
    }

    /// Whether the batches an earlier run left prepared are settled (until then the leaf
    /// refuses scans rather than answer without rows the master committed).
    pub fn recovered(&self) -> bool {
        self.recovered.load(Ordering::Relaxed)
    }

    /// Cuts the wait before the next heartbeat short (the master's Wake call).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Registered, and the last heartbeat reached the master (the leaf's readiness).
    pub fn reaches_master(&self) -> bool {
        self.leaf_id().is_some() && self.reachable.load(Ordering::Relaxed)
    }
}

/// The longest wait between attempts while the master is unreachable. Well under the master's
/// leaf heartbeat timeout (2 s by default): during a master failover a leaf that waited longer
/// would be declared offline by the new master, and its tasks moved, though it never left.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// How long one heartbeat call may take (a frozen or cut-off master is noticed sooner, by
/// the connection's keepalive: see `client`).
const HEARTBEAT_CALL_TIMEOUT: Duration = Duration::from_millis(1500);

pub async fn heartbeat_loop(
    config: LeafConfig,
    aggregators: crate::client::AggregatorList,
    state: Arc<Membership>,
    tasks: Arc<TaskManager>,
    store: Store,
    shutdown: CancellationToken,
) {
    let sweeping = Arc::new(AtomicBool::new(false));
    let mut registered_once = false;
    // A heartbeat that takes longer than this is as good as lost: the master declares a leaf
    // offline after its heartbeat timeout (2 s by default), so a leaf must move on to the new
    // master well before that when the old one stops answering.
    let mut client = MasterClient::with_timeout(aggregators.clone(), HEARTBEAT_CALL_TIMEOUT);
    let address = config.advertise_address();
    let interval = config.heartbeat_interval();
    let mut backoff = interval;
    let mut failing = false;
    // Settle the batches an earlier run left prepared before registering: once registered the
    // leaf serves queries, and a batch the master committed must be visible by then (and one it
    // did not commit must be gone).
    tasks.recover().await;
    if shutdown.is_cancelled() {
        return;
    }
    state.recovered.store(true, Ordering::Relaxed);
    loop {
        let result = match state.leaf_id() {
            None => client
                .call(|mut c| {
                    // Only before this process runs a task (a batch that prepares and commits
                    // meanwhile would be missing from what it says it holds), and only if the
                    // store could say what it holds.
                    let holding = (!registered_once).then(|| held_batches(&store)).flatten();
                    let request = proto::RegisterLeafRequest {
                        address: address.clone(),
                        fresh: holding.is_some(),
                        holding: holding.unwrap_or_default(),
                    };
                    async move { c.register_leaf(request).await }
                })
                .await
                .map(|r| {
                    registered_once = true;
                    state.leaf_id.store(r.leaf_id, Ordering::Relaxed);
                    tracing::info!(leaf_id = r.leaf_id, master = ?client.target(), "registered with the cluster");
                    None
                }),
            Some(id) => client
                .call(|mut c| {
                    let address = address.clone();
                    let tables_generation = store.tables_generation();
                    let offsets_seen = tasks.offsets_seen();
                    async move {
                        c.heartbeat(proto::HeartbeatRequest {
                            leaf_id: id,
                            address,
                            tables_generation,
                            offsets_seen,
                        })
                        .await
                    }
                })
                .await
                .map(|r| {
                    use prost::Message as _;
                    tasks.metrics().set(
                        "shardline_heartbeat_response_bytes",
                        r.encoded_len() as f64,
                    );
                    if let Some(live) = r.live_tables {
                        sweep_dropped_tables(&store, live, &sweeping);
                    }
                    aggregators.replace(r.aggregators);
                    Some(r.tasks)
                }),
        };
        let result = match result {
            Ok(Some(assignments)) => {
                tasks.reconcile(assignments).await;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        state.reachable.store(result.is_ok(), Ordering::Relaxed);
        match result {
            Ok(()) => {
                if failing {
                    tracing::info!(master = ?client.target(), "reached the master aggregator again");
                }
                failing = false;
                backoff = interval;
            }
            Err(CallError::Rejected(status)) if status.code() == tonic::Code::NotFound => {
                tracing::warn!("the cluster does not know this leaf; registering again");
                state.leaf_id.store(0, Ordering::Relaxed);
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        "cannot reach the master aggregator, retrying with backoff: {e}"
                    );
                }
                failing = true;
                backoff = (backoff * 2).min(MAX_BACKOFF.max(interval));
            }
        }
        let wait = if failing { backoff } else { interval };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = state.wake.notified(), if !failing => {}
        }
    }
}

/// Removes the storage of the tables the master's view says were dropped, in the background (a
/// big table takes a while, and heartbeats go on meanwhile); at most one sweep at a time. A
/// sweep that fails leaves the leaf's generation behind, so the next heartbeat brings the view
/// again.
fn sweep_dropped_tables(store: &Store, live: proto::LiveTables, sweeping: &Arc<AtomicBool>) {
    if live.generation == store.tables_generation() || sweeping.swap(true, Ordering::AcqRel) {
        return;
    }
    let mut view = LiveView {
        generation: live.generation,
        high: live.high,
        ..Default::default()
    };
    for t in live.tables {
        match t.id {
            0 => {
                view.legacy.insert((t.database, t.name));
            }
            id => {
                view.ids.insert(id);
            }
        }
    }
    let store = store.clone();
    let sweeping = sweeping.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = store.retain_tables(view) {
            tracing::warn!("cannot remove the storage of dropped tables yet: {e}");
        }
        sweeping.store(false, Ordering::Release);
    });
}

/// Every batch this leaf holds: prepared, or made visible and not yet confirmed to the master
/// (`None` if the store cannot tell).
fn held_batches(store: &Store) -> Option<Vec<proto::ResolveBatchRequest>> {
    let prepared = store.prepared_batches().ok()?;
    let finalized = store.finalized_batches(usize::MAX).ok()?;
    Some(
        prepared
            .into_iter()
            .chain(finalized)
            .map(|k| proto::ResolveBatchRequest {
                pipeline_id: k.pipeline_id,
                task_id: k.task_id,
                epoch: k.epoch,
                seq: k.seq,
            })
            .collect(),
    )
}
