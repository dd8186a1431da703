//! Raft metadata: the catalog replicated over the aggregators with tikv's raft-rs.
//!
//! - `storage`: log, hard state and snapshots in sled;
//! - `driver`: the task that owns the `RawNode`;
//! - `transport`: outbound messages to peers over gRPC;
//! - `logger`: raft's slog into tracing.

mod driver;
mod logger;
mod storage;
mod transport;

pub use driver::RaftStatus;
pub use storage::SledStorage;

use crate::config::AggregatorConfig;
use crate::error::{Error, Result};
use common::catalog::{Catalog, Command, Output};
use common::ids::NodeId;
use driver::{Driver, Input};
use transport::Transport;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A cheap, clonable handle on this node's Raft group member.
#[derive(Clone)]
pub struct RaftHandle {
    inner: Arc<Inner>,
}

struct Inner {
    me: NodeId,
    peers: BTreeMap<NodeId, String>,
    inputs: mpsc::Sender<Input>,
    status: watch::Receiver<RaftStatus>,
    catalog: Arc<RwLock<Catalog>>,
    commit_timeout: Duration,
}

impl RaftHandle {
    /// Opens the store under `<data_dir>/raft`, restores the catalog from the latest snapshot
    /// (committed entries after it are replayed by Raft) and starts the driver.
    pub fn start(
        config: &AggregatorConfig,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        let me = NodeId(config.node_id);
        let peers = config
            .peer_map()
            .map_err(|e| Error::Storage(e.to_string()))?;
        let voters: Vec<u64> = peers.keys().map(|id| id.0).collect();
        let storage = SledStorage::open(&config.data_dir.join("raft"), &voters)?;
        let snapshot = storage.load_snapshot()?;
        let catalog: Catalog = if snapshot.data.is_empty() {
            Catalog::default()
        } else {
            serde_json::from_slice(&snapshot.data)
                .map_err(|e| Error::Corrupt(format!("snapshot catalog: {e}")))?
        };
        let applied = snapshot.get_metadata().index;
        let raft_config = raft::Config {
            id: me.0,
            election_tick: 10,
            heartbeat_tick: 1,
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        raft_config.validate()?;
        let node = raft::RawNode::new(&raft_config, storage.clone(), &logger::logger())?;

        let (inputs_tx, inputs_rx) = mpsc::channel(8192);
        let transport = Transport::start(me, &peers, inputs_tx.clone(), tasks, shutdown.clone());
        let catalog = Arc::new(RwLock::new(catalog));
        let initial = RaftStatus {
            node: me,
            leader: None,
            term: 0,
            role: "Follower",
            applied,
        };
        let (status_tx, status_rx) = watch::channel(initial);
        let driver = Driver {
            me,
            node,
            storage,
            transport,
            catalog: catalog.clone(),
            status: status_tx,
            pending: HashMap::new(),
            next_proposal: rand::random::<u64>() >> 1,
            applied,
            snapshot_entries: config.raft_snapshot_entries,
        };
        let tick = config.raft_tick();
        let driver_shutdown = shutdown.clone();
        tasks.spawn(async move {
            if driver.run(inputs_rx, tick, driver_shutdown).await.is_err() {
                // The store failed: this node can no longer take part safely.
                shutdown.cancel();
            }
        });
        Ok(Self {
            inner: Arc::new(Inner {
                me,
                peers,
                inputs: inputs_tx,
                status: status_rx,
                catalog,
                commit_timeout: config.commit_timeout(),
            }),
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.me
    }

    /// Every aggregator of the group: id -> gRPC address.
    pub fn peers(&self) -> &BTreeMap<NodeId, String> {
        &self.inner.peers
    }

    pub fn status(&self) -> RaftStatus {
        self.inner.status.borrow().clone()
    }

    pub fn watch_status(&self) -> watch::Receiver<RaftStatus> {
        self.inner.status.clone()
    }

    pub fn is_leader(&self) -> bool {
        self.status().is_leader()
    }

    /// The leader's gRPC address, if one is known.
    pub fn leader_address(&self) -> Option<String> {
        self.status()
            .leader
            .and_then(|l| self.inner.peers.get(&l).cloned())
    }

    /// The error to give a caller that needs the leader when this node is not it.
    pub fn not_leader(&self) -> Error {
        match self.status().leader {
            Some(leader) => Error::NotLeader {
                leader,
                address: self.inner.peers.get(&leader).cloned(),
            },
            None => Error::NoLeader,
        }
    }

    /// Reads the catalog as this node has applied it.
    pub fn read_catalog<R>(&self, f: impl FnOnce(&Catalog) -> R) -> R {
        f(&self.inner.catalog.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Proposes a command (raft-rs forwards it to the leader if this node is a follower) and
    /// waits until it is applied on this node, so the caller reads its own write.
    pub async fn propose(&self, command: Command) -> Result<Output> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .inputs
            .send(Input::Propose { command, reply: tx })
            .await
            .map_err(|_| Error::Shutdown)?;
        match tokio::time::timeout(self.inner.commit_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Shutdown),
            Err(_) => Err(Error::CommitTimeout(self.inner.commit_timeout)),
        }
    }

    /// Hands a Raft message from a peer to the driver (dropped if the driver is overloaded).
    pub fn step(&self, msg: raft::eraftpb::Message) {
        let _ = self.inner.inputs.try_send(Input::Step(msg));
    }
}
