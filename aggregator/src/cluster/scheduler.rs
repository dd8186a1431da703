//! Task scheduling on the master: every task of a running pipeline runs on an online leaf
//! that holds partitions of the pipeline's database; a task whose leaf is lost moves to the
//! least loaded live leaf with a new epoch (which fences the old one). When a pipeline's tasks
//! are uneven over the leaves that could run them (a leaf came back, or joined and got
//! partitions by REBALANCE PARTITIONS), one task at a time moves from the busiest to the idlest.
//! The plan is looked at soon after every catalog change and the leaves concerned are woken, so
//! a started pipeline's tasks run within milliseconds, not a scheduler tick plus a heartbeat.

use crate::cluster::leaf_client;
use crate::raft::RaftHandle;
use common::catalog::pipelines::PipelineState;
use common::catalog::{Catalog, Command};
use common::ids::LeafId;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The assignments the catalog needs now (pure: decided from the catalog alone).
pub fn plan(catalog: &Catalog) -> Vec<Command> {
    let mut load: BTreeMap<LeafId, usize> = catalog
        .leaves
        .values()
        .filter(|l| l.online)
        .map(|l| (l.id, 0))
        .collect();
    for p in catalog.pipelines.values() {
        for t in &p.tasks {
            if let Some(l) = t.leaf {
                if let Some(n) = load.get_mut(&l) {
                    *n += 1;
                }
            }
        }
    }
    let mut out = Vec::new();
    for p in catalog
        .pipelines
        .values()
        .filter(|p| p.state == PipelineState::Running)
    {
        let holders: Vec<LeafId> = catalog
            .databases
            .get(&p.database)
            .map(|d| d.leaves())
            .unwrap_or_default();
        let mut moved = false;
        for t in &p.tasks {
            let healthy = t.epoch != 0
                && t.leaf
                    .is_some_and(|l| load.contains_key(&l) && holders.contains(&l));
            if healthy {
                continue;
            }
            let best = holders
                .iter()
                .filter_map(|l| load.get(l).map(|n| (*n, *l)))
                .min()
                .map(|(_, l)| l);
            if let Some(leaf) = best {
                if let Some(n) = load.get_mut(&leaf) {
                    *n += 1;
                }
                out.push(Command::AssignTask {
                    pipeline_id: p.id,
                    task_id: t.task_id,
                    leaf: Some(leaf),
                });
                moved = true;
            }
        }
        if !moved {
            if let Some(cmd) = even_out(p, &holders, &load) {
                out.push(cmd);
            }
        }
    }
    out
}

/// One task move that evens out a pipeline whose healthy tasks differ by two or more between
/// the online leaves able to run them; `None` when it is even enough.
fn even_out(
    p: &common::catalog::pipelines::Pipeline,
    holders: &[LeafId],
    online: &BTreeMap<LeafId, usize>,
) -> Option<Command> {
    let mut count: BTreeMap<LeafId, usize> = holders
        .iter()
        .filter(|l| online.contains_key(l))
        .map(|l| (*l, 0))
        .collect();
    for t in &p.tasks {
        if let Some(n) = t.leaf.and_then(|l| count.get_mut(&l)) {
            *n += 1;
        }
    }
    let (busiest, most) = count
        .iter()
        .max_by_key(|(l, n)| (**n, std::cmp::Reverse(**l)))?;
    let (idlest, least) = count.iter().min_by_key(|(l, n)| (**n, **l))?;
    if most < &(least + 2) {
        return None;
    }
    let task = p.tasks.iter().rev().find(|t| t.leaf == Some(*busiest))?;
    Some(Command::AssignTask {
        pipeline_id: p.id,
        task_id: task.task_id,
        leaf: Some(*idlest),
    })
}

/// How soon after a change to the catalog the plan is looked at again (changes come in bursts:
/// a START PIPELINE, a leaf marked offline, thousands of batch commits a second).
const SETTLE: Duration = Duration::from_millis(5);

/// Applies [`plan`] while this node is the master: soon after every change to the catalog
/// (a pipeline started, a leaf lost or back), and every 200 ms regardless. Leaves that gain or
/// lose a task are woken, so they heartbeat and learn it at once instead of at their next beat.
pub async fn run(
    raft: RaftHandle,
    metrics: std::sync::Arc<common::metrics::Metrics>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status = raft.watch_status();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
            changed = status.changed() => {
                if changed.is_err() {
                    return;
                }
                tokio::time::sleep(SETTLE).await;
            }
        }
        if !raft.is_leader() {
            continue;
        }
        let commands = raft.read_catalog(plan);
        let mut woken = BTreeSet::new();
        for cmd in commands {
            if let Command::AssignTask {
                pipeline_id,
                task_id,
                leaf,
            } = &cmd
            {
                tracing::info!(pipeline = pipeline_id, task = task_id, leaf = ?leaf.map(|l| l.0), "assigning task");
                let before = raft.read_catalog(|c| {
                    c.pipelines
                        .get(pipeline_id)
                        .and_then(|p| p.tasks.iter().find(|t| t.task_id == *task_id))
                        .and_then(|t| t.leaf)
                });
                woken.extend(before);
                woken.extend(*leaf);
            }
            if let Err(e) = raft.propose(cmd).await {
                tracing::warn!("task assignment failed: {e}");
                break;
            }
            metrics.add("shardline_task_assignments_total", 1.0);
        }
        if !woken.is_empty() {
            wake(&raft, &woken);
        }
    }
}

/// Asks leaves to heartbeat now (best effort: a leaf that misses it learns at its next beat).
fn wake(raft: &RaftHandle, leaves: &BTreeSet<LeafId>) {
    let addresses: Vec<String> = raft.read_catalog(|c| {
        leaves
            .iter()
            .filter_map(|id| c.leaves.get(id))
            .filter(|l| l.online)
            .map(|l| l.address.clone())
            .collect()
    });
    for address in addresses {
        tokio::spawn(async move {
            let Ok(mut client) = leaf_client::client(&address, Duration::from_millis(500)) else {
                return;
            };
            if let Err(e) = client.wake(proto::WakeRequest {}).await {
                tracing::debug!(leaf = %address, "cannot wake the leaf: {e}");
            }
        });
    }
}
