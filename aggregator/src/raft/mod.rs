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
use proto::aggregator_client::AggregatorClient;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use transport::Transport;

/// The catalog as this node has applied it, and its generations: numbers that change with
/// every change to it (`all`), and with every change to what queries plan against (`tables`,
/// [`Command::changes_tables`]), so what is derived from a catalog (information_schema, a
/// query's table providers and kept plans) is kept until the part it depends on changes.
#[derive(Debug, Default)]
pub(crate) struct SharedCatalog {
    catalog: RwLock<Catalog>,
    all: std::sync::atomic::AtomicU64,
    tables: std::sync::atomic::AtomicU64,
}

/// The generations of a catalog as read ([`SharedCatalog`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generations {
    pub all: u64,
    pub tables: u64,
}

impl SharedCatalog {
    pub(crate) fn read<R>(&self, f: impl FnOnce(&Catalog, Generations) -> R) -> R {
        use std::sync::atomic::Ordering::Acquire;
        let c = self.catalog.read().unwrap_or_else(|p| p.into_inner());
        // Read under the lock: a writer moves them on before letting readers in again.
        let generations = Generations {
            all: self.all.load(Acquire),
            tables: self.tables.load(Acquire),
        };
        f(&c, generations)
    }

    /// Changes the catalog in any way (both generations move).
    pub(crate) fn write<R>(&self, f: impl FnOnce(&mut Catalog) -> R) -> R {
        self.change(true, f)
    }

    /// Applies a committed command; the tables generation moves only if the command can
    /// change what queries plan against.
    pub(crate) fn apply(&self, command: Command) -> common::Result<Output> {
        let tables = command.changes_tables();
        self.change(tables, |c| c.apply(command))
    }

    fn change<R>(&self, tables: bool, f: impl FnOnce(&mut Catalog) -> R) -> R {
        use std::sync::atomic::Ordering::AcqRel;
        let mut c = self.catalog.write().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut c);
        self.all.fetch_add(1, AcqRel);
        if tables {
            self.tables.fetch_add(1, AcqRel);
        }
        out
    }
}

/// A cheap, clonable handle on this node's Raft group member.
#[derive(Clone)]
pub struct RaftHandle {
    inner: Arc<Inner>,
}

struct Inner {
    me: NodeId,
    /// Every member's gRPC address: `--peers` until the catalog knows the members, then the
    /// catalog's (kept current by the driver as members are added and removed).
    peers: Arc<RwLock<BTreeMap<NodeId, String>>>,
    inputs: mpsc::Sender<Input>,
    status: watch::Receiver<RaftStatus>,
    catalog: Arc<SharedCatalog>,
    commit_timeout: Duration,
    /// gRPC clients to other aggregators, for forwarded writes.
    clients: std::sync::Mutex<HashMap<NodeId, AggregatorClient<Channel>>>,
    /// Set when the driver stopped on an error: the node must exit non-zero.
    failed: Arc<std::sync::atomic::AtomicBool>,
    /// Set once the driver runs (this node takes part in Raft).
    launched: std::sync::atomic::AtomicBool,
}

/// How a node takes part in Raft when it launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// Its data directory holds its Raft state: it carries on from it.
    Existing,
    /// A new cluster: every member starts empty with the `--peers` voters.
    Bootstrap,
    /// It joins a running cluster with an empty configuration, and learns the membership from
    /// the master's snapshot (every member snapshots right after a membership change, so a
    /// master's log never starts before the last one).
    Join,
}

/// What [`RaftHandle::launch`] needs: the driver's inbox, kept until the node launches.
pub struct Launcher {
    inputs: mpsc::Receiver<Input>,
    status: watch::Sender<RaftStatus>,
}

impl RaftHandle {
    /// A handle for this node, before it takes part in Raft: messages and proposals queue (or
    /// time out) until [`RaftHandle::launch`]. The gRPC service can answer identity questions
    /// from other nodes meanwhile.
    pub fn new(config: &AggregatorConfig) -> Result<(Self, Launcher)> {
        let me = NodeId(config.node_id);
        let peers = config
            .peer_map()
            .map_err(|e| Error::Storage(e.to_string()))?;
        let (inputs_tx, inputs_rx) = mpsc::channel(8192);
        let initial = RaftStatus {
            node: me,
            leader: None,
            term: 0,
            role: "Follower",
            applied: 0,
            snapshot_bytes: 0,
            snapshot_encode_ms: 0,
        };
        let (status_tx, status_rx) = watch::channel(initial);
        let handle = Self {
            inner: Arc::new(Inner {
                me,
                peers: Arc::new(RwLock::new(peers)),
                inputs: inputs_tx,
                status: status_rx,
                catalog: Default::default(),
                commit_timeout: config.commit_timeout(),
                clients: Default::default(),
                failed: Default::default(),
                launched: Default::default(),
            }),
        };
        let launcher = Launcher {
            inputs: inputs_rx,
            status: status_tx,
        };
        Ok((handle, launcher))
    }

    /// Opens the store under `<data_dir>/raft`, restores the catalog from the latest snapshot
    /// (committed entries after it are replayed by Raft) and starts the driver.
    pub fn launch(
        &self,
        launcher: Launcher,
        membership: Membership,
        config: &AggregatorConfig,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let me = self.inner.me;
        let voters: Vec<u64> = match membership {
            Membership::Join => vec![],
            Membership::Existing | Membership::Bootstrap => {
                self.peers().keys().map(|id| id.0).collect()
            }
        };
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

        let members = catalog.member_addresses();
        if !members.is_empty() {
            *self.inner.peers.write().unwrap_or_else(|p| p.into_inner()) = members;
        }
        let transport = Transport::start(
            me,
            &self.peers(),
            self.inner.inputs.clone(),
            tasks,
            shutdown.clone(),
        );
        self.inner.catalog.write(|c| *c = catalog);
        let Launcher { inputs, status } = launcher;
        status.send_modify(|s| s.applied = applied);
        let driver = Driver {
            me,
            node,
            storage,
            transport,
            catalog: self.inner.catalog.clone(),
            peers: self.inner.peers.clone(),
            status,
            pending: HashMap::new(),
            next_proposal: rand::random::<u64>() >> 1,
            reads: HashMap::new(),
            next_read: 0,
            applied,
            snapshot_entries: config.raft_snapshot_entries,
            snapshot_now: false,
            snapshot_in_flight: false,
            encoded: None,
            feedback: self.inner.inputs.clone(),
            last_snapshot: (0, 0),
        };
        let tick = config.raft_tick();
        let driver_task = tokio::spawn(driver.run(inputs, tick, shutdown.clone()));
        let failed_flag = self.inner.failed.clone();
        tasks.spawn(async move {
            let outcome = match driver_task.await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(join) => format!("raft driver crashed: {join}"),
            };
            // This node can no longer take part safely: stop it, loudly.
            tracing::error!("stopping the aggregator: {outcome}");
            failed_flag.store(true, std::sync::atomic::Ordering::SeqCst);
            shutdown.cancel();
        });
        self.inner
            .launched
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(?membership, "raft started");
        Ok(())
    }

    /// Whether this node takes part in Raft yet.
    pub fn launched(&self) -> bool {
        self.inner
            .launched
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the Raft driver stopped on an error.
    pub fn failed(&self) -> bool {
        self.inner.failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.me
    }

    /// Every aggregator of the group: id -> gRPC address.
    pub fn peers(&self) -> BTreeMap<NodeId, String> {
        self.inner
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn peer_address(&self, id: NodeId) -> Option<String> {
        self.inner
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
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
        self.status().leader.and_then(|l| self.peer_address(l))
    }

    /// The error to give a caller that needs the leader when this node is not it.
    pub fn not_leader(&self) -> Error {
        match self.status().leader {
            Some(leader) => Error::NotLeader {
                leader,
                address: self.peer_address(leader),
            },
            None => Error::NoLeader,
        }
    }

    /// Waits until this node has applied everything the master had committed when the call
    /// began, as the master confirms with a quorum (Raft's ReadIndex): what it reads of the
    /// catalog afterwards is current, on a follower too. An aggregator that cannot reach a
    /// master that can reach a quorum (cut off, or during an election) says so within
    /// [`READ_BARRIER_TIMEOUT`] instead of answering from a view that may be stale.
    pub async fn read_barrier(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + READ_BARRIER_TIMEOUT;
        loop {
            let (tx, rx) = oneshot::channel();
            self.inner
                .inputs
                .send(Input::ReadIndex { reply: tx })
                .await
                .map_err(|_| Error::Shutdown)?;
            // A request the master dropped (not settled in its term yet, or none known) is
            // asked again.
            let attempt = deadline.min(tokio::time::Instant::now() + Duration::from_millis(200));
            if let Ok(Ok(index)) = tokio::time::timeout_at(attempt, rx).await {
                let mut status = self.inner.status.clone();
                return match tokio::time::timeout_at(
                    deadline,
                    status.wait_for(|s| s.applied >= index),
                )
                .await
                {
                    Ok(Ok(_)) => Ok(()),
                    _ => Err(Error::NoMasterContact(READ_BARRIER_TIMEOUT)),
                };
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::NoMasterContact(READ_BARRIER_TIMEOUT));
            }
        }
    }

    /// Reads the catalog as this node has applied it.
    pub fn read_catalog<R>(&self, f: impl FnOnce(&Catalog) -> R) -> R {
        self.inner.catalog.read(|c, _| f(c))
    }

    /// Reads the catalog with its generations ([`SharedCatalog`]).
    pub fn read_catalog_generation<R>(&self, f: impl FnOnce(&Catalog, Generations) -> R) -> R {
        self.inner.catalog.read(f)
    }

    /// Commits a command through the master and waits until this node has applied it too,
    /// so the caller reads its own write. On a follower the write is forwarded over gRPC.
    /// While there is no master (an election), or an attempt's outcome is unknown (the master
    /// changed, or died before it answered), it waits and tries again, up to the commit
    /// timeout. Every attempt carries the same request id, so the catalog applies the command
    /// once and a retry gets the first attempt's outcome (a CREATE that took effect is not
    /// told "exists" by its own retry).
    pub async fn propose(&self, command: Command) -> Result<Output> {
        let command = match command {
            // Idempotent by their own keys, and the hot path: no request log entry.
            c @ (Command::CommitBatch(_)
            | Command::BatchesFinalized { .. }
            | Command::Request { .. }) => c,
            c => Command::Request {
                id: rand::random(),
                command: Box::new(c),
            },
        };
        let deadline = tokio::time::Instant::now() + self.inner.commit_timeout;
        let mut status = self.inner.status.clone();
        loop {
            let leader = status.borrow_and_update().leader;
            let attempt = match leader {
                None => Err(Error::NoLeader),
                Some(l) if l == self.inner.me => self
                    .propose_local(command.clone(), deadline)
                    .await
                    .map(|(out, _)| out),
                Some(l) => self.forward(l, &command, deadline).await,
            };
            let again = |e: &Error| e.is_retryable() || matches!(e, Error::CommitUnknown(_));
            match attempt {
                Err(e) if again(&e) && tokio::time::Instant::now() < deadline => {
                    tracing::debug!("write will be retried: {e}");
                    // Wait for news of the group (a new leader), but poll as well.
                    let _ = tokio::time::timeout_at(
                        deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)),
                        status.changed(),
                    )
                    .await;
                }
                Err(e) if e.is_retryable() => {
                    return Err(Error::CommitTimeout(self.inner.commit_timeout))
                }
                Err(e @ Error::CommitUnknown(_)) => return Err(e),
                other => return other,
            }
        }
    }

    /// Proposes on this node only while it is the leader, once: no retry, no forwarding to
    /// another leader. For a write whose reason holds only for this leader's term (a judgment
    /// from what this master saw). Under a new leader it fails (`NotLeader`); an entry this
    /// node appended before learning of one is dropped by Raft.
    pub async fn propose_as_leader(&self, command: Command) -> Result<Output> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let command = Command::Request {
            id: rand::random(),
            command: Box::new(command),
        };
        let deadline = tokio::time::Instant::now() + self.inner.commit_timeout;
        self.propose_local(command, deadline)
            .await
            .map(|(out, _)| out)
    }

    /// Proposes on this node, which must be the leader; waits for the entry to be applied and
    /// returns its output and log index.
    pub async fn propose_local(
        &self,
        command: Command,
        deadline: tokio::time::Instant,
    ) -> Result<(Output, u64)> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .inputs
            .send(Input::Propose { command, reply: tx })
            .await
            .map_err(|_| Error::Shutdown)?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Shutdown),
            Err(_) => Err(Error::CommitTimeout(self.inner.commit_timeout)),
        }
    }

    /// Sends a write to the master and waits until this node has applied it as well.
    async fn forward(
        &self,
        leader: NodeId,
        command: &Command,
        deadline: tokio::time::Instant,
    ) -> Result<Output> {
        let addr = self
            .peer_address(leader)
            .ok_or_else(|| Error::Forward(format!("unknown master {leader}")))?;
        let mut client = self.client(leader, &addr)?;
        let bytes = serde_json::to_vec(command).map_err(|e| Error::Corrupt(e.to_string()))?;
        let call = client.propose(proto::ProposeRequest { command: bytes });
        let response = match tokio::time::timeout_at(deadline, call).await {
            Err(_) => return Err(Error::CommitTimeout(self.inner.commit_timeout)),
            Ok(Err(status)) => {
                return Err(match status.code() {
                    // The master refused before doing anything (not master any more, no
                    // leader, write lost to a leader change) or could not be reached at all.
                    tonic::Code::Unavailable => Error::Forward(status.message().to_string()),
                    _ => Error::CommitUnknown(status.message().to_string()),
                });
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: std::result::Result<Output, common::Error> =
            serde_json::from_slice(&response.result)
                .map_err(|e| Error::Corrupt(format!("forwarded result: {e}")))?;
        let mut status = self.inner.status.clone();
        let _ = tokio::time::timeout_at(deadline, status.wait_for(|s| s.applied >= response.index))
            .await;
        Ok(result?)
    }

    fn client(&self, id: NodeId, addr: &str) -> Result<AggregatorClient<Channel>> {
        let mut clients = self.inner.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&id) {
            return Ok(c.clone());
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::Forward(format!("bad master address {addr}: {e}")))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true);
        let client = AggregatorClient::new(endpoint.connect_lazy());
        clients.insert(id, client.clone());
        Ok(client)
    }

    /// Serves a write forwarded by a follower: this node must be the master.
    /// Returns the deterministic result and the index it was applied at.
    pub async fn serve_forwarded(
        &self,
        command: Command,
    ) -> Result<(std::result::Result<Output, common::Error>, u64)> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let deadline = tokio::time::Instant::now() + self.inner.commit_timeout;
        let fault = exit_after_forwarded(&command);
        match self.propose_local(command, deadline).await {
            Ok((out, index)) => {
                if fault {
                    // Fault injection for the tests: the master dies after applying a
                    // forwarded write and before its answer leaves.
                    tracing::error!(
                        "{EXIT_AFTER_FORWARDED} is set: exiting after a forwarded write"
                    );
                    std::process::exit(87);
                }
                Ok((Ok(out), index))
            }
            // A deterministic refusal changed nothing: there is nothing to wait for.
            Err(Error::Catalog(e)) => Ok((Err(e), 0)),
            Err(e) => Err(e),
        }
    }

    /// Hands a Raft message from a peer to the driver (dropped if the driver is overloaded).
    pub fn step(&self, msg: raft::eraftpb::Message) {
        let _ = self.inner.inputs.try_send(Input::Step(msg));
    }
}

/// Set in an aggregator's environment (tests only) to a file path: the first master that
/// applies a forwarded CREATE DATABASE exits before answering, and creates the file so that
/// the next master does not.
pub const EXIT_AFTER_FORWARDED: &str = "SHARDLINE_TEST_EXIT_AFTER_FORWARDED_CREATE_DATABASE";

fn exit_after_forwarded(command: &Command) -> bool {
    let Some(flag) = std::env::var_os(EXIT_AFTER_FORWARDED) else {
        return false;
    };
    let creates_database = match command {
        Command::Request { command, .. } => matches!(**command, Command::CreateDatabase { .. }),
        other => matches!(other, Command::CreateDatabase { .. }),
    };
    creates_database
        && std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(flag)
            .is_ok()
}

/// How long a read waits for the master's confirmation ([`RaftHandle::read_barrier`]): an
/// election here takes about 3 s, so a query that meets one waits for the new master.
pub const READ_BARRIER_TIMEOUT: Duration = Duration::from_secs(5);
