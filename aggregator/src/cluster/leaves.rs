//! Leaf liveness, kept by the master aggregator.
//!
//! Heartbeat times stay in the master's memory; only transitions (online <-> offline) go
//! through Raft. A new master gives every leaf a full timeout before judging it.

use crate::error::{Error, Result};
use crate::raft::RaftHandle;
use crate::sql::exec::now_ms;
use common::catalog::Command;
use common::ids::LeafId;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub struct LeafMonitor {
    raft: RaftHandle,
    timeout: Duration,
    last_seen: Mutex<HashMap<LeafId, Instant>>,
}

impl LeafMonitor {
    pub fn new(raft: RaftHandle, timeout: Duration) -> Self {
        Self {
            raft,
            timeout,
            last_seen: Mutex::new(HashMap::new()),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<LeafId, Instant>> {
        self.last_seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a leaf (by address) and returns its id. Master only. `holding`: from a leaf
    /// process that just started, every batch it holds (see `Command::RegisterLeaf`).
    pub async fn register(
        &self,
        address: String,
        holding: Option<Vec<common::catalog::pipelines::BatchRef>>,
    ) -> Result<LeafId> {
        if !self.raft.is_leader() {
            return Err(self.raft.not_leader());
        }
        let out = self
            .raft
            .propose(Command::RegisterLeaf {
                address: address.clone(),
                now_ms: now_ms(),
                holding,
            })
            .await?;
        let common::catalog::Output::Leaf(id) = out else {
            return Err(Error::Corrupt("RegisterLeaf returned no id".into()));
        };
        self.seen().insert(id, Instant::now());
        tracing::info!(leaf = %id, %address, "leaf registered");
        Ok(id)
    }

    /// Records a heartbeat; a leaf that was offline is marked online again. Master only.
    pub async fn heartbeat(&self, id: LeafId) -> Result<()> {
        if !self.raft.is_leader() {
            return Err(self.raft.not_leader());
        }
        let online = self
            .raft
            .read_catalog(|c| c.leaves.get(&id).map(|l| l.online))
            .ok_or(common::Error::LeafNotFound { id: id.0 })?;
        self.seen().insert(id, Instant::now());
        if !online {
            self.raft
                .propose(Command::SetLeafOnline {
                    id,
                    online: true,
                    now_ms: now_ms(),
                })
                .await?;
            tracing::info!(leaf = %id, "leaf is back online");
        }
        Ok(())
    }

    /// Marks leaves offline when they stay silent past the timeout, while this node is master.
    pub async fn run(&self, shutdown: CancellationToken) {
        let tick = Duration::from_millis(100);
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_leader = false;
        let mut last_tick = Instant::now();
        // Each leaf's state at the previous tick.
        let mut was_online: HashMap<LeafId, bool> = HashMap::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if !self.raft.is_leader() {
                if was_leader {
                    self.seen().clear();
                }
                was_leader = false;
                continue;
            }
            let now = Instant::now();
            // A node that did not run (frozen, starved, suspended) heard nothing meanwhile,
            // whoever was silent: it cannot judge others by that time.
            let paused = now.duration_since(last_tick) > tick + self.timeout / 2;
            last_tick = now;
            let leaves: Vec<(LeafId, bool)> = self
                .raft
                .read_catalog(|c| c.leaves.values().map(|l| (l.id, l.online)).collect());
            let silent: Vec<LeafId> = {
                let mut seen = self.seen();
                if paused && was_leader {
                    tracing::info!(
                        "this node did not run for a while: leaf heartbeat clocks start again"
                    );
                }
                if !was_leader || paused {
                    // A new master has no heartbeat history: start every clock now.
                    for (id, _) in &leaves {
                        seen.insert(*id, now);
                    }
                }
                // A leaf that came back online since the last tick (a registration or a
                // heartbeat, perhaps still on its way to `seen`) starts a fresh clock.
                for (id, online) in &leaves {
                    if *online && was_online.get(id) == Some(&false) {
                        seen.insert(*id, now);
                    }
                }
                was_online = leaves.iter().copied().collect();
                leaves
                    .iter()
                    .filter(|(id, online)| {
                        *online && seen.entry(*id).or_insert(now).elapsed() > self.timeout
                    })
                    .map(|(id, _)| *id)
                    .collect()
            };
            was_leader = true;
            for id in silent {
                tracing::warn!(leaf = %id, timeout = ?self.timeout, "leaf lost: no heartbeat");
                // Judged by this master's clocks: never forwarded to another one, which
                // may have heard from the leaf all along.
                if let Err(e) = self
                    .raft
                    .propose_as_leader(Command::SetLeafOnline {
                        id,
                        online: false,
                        now_ms: now_ms(),
                    })
                    .await
                {
                    tracing::warn!(leaf = %id, "could not mark leaf offline: {e}");
                }
            }
        }
    }
}
