//! The Raft driver: one task owns the `RawNode`, takes proposals and messages from a channel,
//! ticks on an interval, and handles each `Ready` in raft-rs's documented order.

use super::storage::SledStorage;
use super::transport::Transport;
use crate::error::{Error, Result};
use common::catalog::MemberChange;
use common::catalog::{Catalog, Command, Output};
use common::ids::NodeId;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType, Message, MessageType, Snapshot};
use raft::{RawNode, SnapshotStatus, StateRole};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// What the driver is asked to do.
pub enum Input {
    /// Propose a catalog command; the reply comes when it is applied here.
    Propose { command: Command, reply: Reply },
    /// A Raft message from another aggregator.
    Step(Message),
    /// The transport could not reach a peer.
    Unreachable { to: u64 },
    /// A snapshot was (or failed to be) delivered to a peer.
    SnapshotSent { to: u64, ok: bool },
    /// A catalog snapshot encoded off the driver ([`Driver::maybe_snapshot`]): compact the log
    /// behind it.
    SnapshotEncoded(Box<Encoded>),
    /// Ask the master for its commit index, confirmed by a quorum (Raft's ReadIndex): answered
    /// with that index, or never (no master, or one not yet settled in its term).
    ReadIndex { reply: oneshot::Sender<u64> },
}

/// A snapshot of the catalog as of `index`, encoded on a blocking thread.
pub struct Encoded {
    index: u64,
    conf_state: raft::eraftpb::ConfState,
    data: Result<Vec<u8>>,
    took: Duration,
}

/// Answers a proposal: its output and the log index it was applied at.
pub type Reply = oneshot::Sender<Result<(Output, u64)>>;

/// This node's view of the Raft group, published after every `Ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftStatus {
    pub node: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub role: &'static str,
    pub applied: u64,
    /// The last catalog snapshot this node took: its size and how long encoding it took.
    pub snapshot_bytes: u64,
    pub snapshot_encode_ms: u64,
}

impl RaftStatus {
    pub fn is_leader(&self) -> bool {
        self.leader == Some(self.node)
    }
}

fn role_name(role: StateRole) -> &'static str {
    match role {
        StateRole::Leader => "Leader",
        StateRole::Follower => "Follower",
        StateRole::Candidate => "Candidate",
        StateRole::PreCandidate => "PreCandidate",
    }
}

pub struct Driver {
    pub(super) me: NodeId,
    pub(super) node: RawNode<SledStorage>,
    pub(super) storage: SledStorage,
    pub(super) transport: Transport,
    pub(super) catalog: Arc<super::SharedCatalog>,
    /// Every member's gRPC address, shared with the handle.
    pub(super) peers: Arc<RwLock<BTreeMap<NodeId, String>>>,
    pub(super) status: watch::Sender<RaftStatus>,
    /// Proposals awaiting apply, by the log index they were appended at (leader only).
    pub(super) pending: HashMap<u64, (u64, Reply)>,
    pub(super) next_proposal: u64,
    /// ReadIndex requests awaiting their index, by request id.
    pub(super) reads: HashMap<u64, oneshot::Sender<u64>>,
    pub(super) next_read: u64,
    pub(super) applied: u64,
    pub(super) snapshot_entries: u64,
    /// A membership change was applied: snapshot now, so that no master's log starts before
    /// it (a joining member, which starts with an empty configuration, must learn the
    /// membership from a snapshot, never by replaying entries from the start).
    pub(super) snapshot_now: bool,
    /// A snapshot is being encoded off the driver.
    pub(super) snapshot_in_flight: bool,
    /// A snapshot encoded off the driver, to compact the log behind at the next `Ready`.
    pub(super) encoded: Option<Box<Encoded>>,
    /// The driver's own inbox, for snapshots encoded elsewhere.
    pub(super) feedback: mpsc::Sender<Input>,
    pub(super) last_snapshot: (u64, u64),
}

/// Proposal context: the proposing node and a per-node proposal id.
fn context(node: NodeId, id: u64) -> Vec<u8> {
    let mut ctx = node.0.to_be_bytes().to_vec();
    ctx.extend_from_slice(&id.to_be_bytes());
    ctx
}

fn parse_context(ctx: &[u8]) -> Option<(NodeId, u64)> {
    let node = u64::from_be_bytes(ctx.get(..8)?.try_into().ok()?);
    let id = u64::from_be_bytes(ctx.get(8..16)?.try_into().ok()?);
    Some((NodeId(node), id))
}

impl Driver {
    pub async fn run(
        mut self,
        mut inputs: mpsc::Receiver<Input>,
        tick: Duration,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.publish_status();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {
                    self.node.tick();
                    self.pending.retain(|_, (_, tx)| !tx.is_closed());
                    self.reads.retain(|_, tx| !tx.is_closed());
                }
                input = inputs.recv() => {
                    let Some(input) = input else { break };
                    self.handle(input);
                    // Take what else is queued so one Ready (one fsync) covers all of it.
                    for _ in 0..1024 {
                        match inputs.try_recv() {
                            Ok(input) => self.handle(input),
                            Err(_) => break,
                        }
                    }
                }
            }
            if let Err(e) = self.on_ready().await {
                tracing::error!("raft driver stopped: {e}");
                self.fail_pending(|| Error::Storage(format!("raft driver stopped: {e}")));
                return Err(e);
            }
        }
        self.fail_pending(|| Error::Shutdown);
        Ok(())
    }

    fn fail_pending(&mut self, err: impl Fn() -> Error) {
        for (_, (_, tx)) in self.pending.drain() {
            let _ = tx.send(Err(err()));
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Propose { command, reply } => self.propose(command, reply),
            Input::Step(mut msg) => {
                // A member that lost its data (wiped disk) comes back with an empty log while
                // the leader still remembers its old progress and sends a commit index beyond
                // it, which raft-rs treats as a fatal invariant breach. Clamp it: the leader
                // then learns the real position from the reply and sends a snapshot.
                if msg.get_msg_type() == MessageType::MsgHeartbeat {
                    let last = self.node.raft.raft_log.last_index();
                    if msg.commit > last {
                        tracing::debug!(
                            commit = msg.commit,
                            last,
                            "clamping heartbeat commit to our log"
                        );
                        msg.commit = last;
                    }
                }
                if let Err(e) = self.node.step(msg) {
                    tracing::debug!("raft step: {e}");
                }
            }
            Input::ReadIndex { reply } => {
                let id = self.next_read;
                self.next_read = self.next_read.wrapping_add(1);
                self.reads.insert(id, reply);
                self.node.read_index(id.to_be_bytes().to_vec());
            }
            Input::SnapshotEncoded(encoded) => self.encoded = Some(encoded),
            Input::Unreachable { to } => self.node.report_unreachable(to),
            Input::SnapshotSent { to, ok } => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.node.report_snapshot(to, status);
            }
        }
    }

    fn propose(&mut self, command: Command, reply: Reply) {
        // Only the leader proposes: a proposal raft-rs forwarded to a leader that then died
        // would vanish silently. Followers forward writes over gRPC instead (RaftHandle).
        if self.node.raft.state != StateRole::Leader {
            let leader = self.node.raft.leader_id;
            let err = if leader == raft::INVALID_ID {
                Error::NoLeader
            } else {
                Error::NotLeader {
                    leader: NodeId(leader),
                    address: None,
                }
            };
            let _ = reply.send(Err(err));
            return;
        }
        let data = match serde_json::to_vec(&command) {
            Ok(d) => d,
            Err(e) => {
                let _ = reply.send(Err(Error::Corrupt(format!("encode command: {e}"))));
                return;
            }
        };
        let id = self.next_proposal;
        self.next_proposal = self.next_proposal.wrapping_add(1);
        let index = self.node.raft.raft_log.last_index() + 1;
        let proposed = match command.member_change() {
            None => self.node.propose(context(self.me, id), data),
            Some(change) => match self.conf_change(&command, change, data) {
                Ok(cc) => self.node.propose_conf_change(context(self.me, id), cc),
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            },
        };
        match proposed {
            Ok(()) if self.node.raft.raft_log.last_index() == index => {
                self.pending.insert(index, (id, reply));
            }
            Ok(()) => {
                let _ = reply.send(Err(Error::ProposalLost));
            }
            Err(raft::Error::ProposalDropped) => {
                let _ = reply.send(Err(Error::NoLeader));
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
            }
        }
    }

    /// The Raft configuration change for a membership command, checked first: once committed,
    /// a configuration change takes effect whatever the catalog would say.
    fn conf_change(
        &self,
        command: &Command,
        change: MemberChange,
        data: Vec<u8>,
    ) -> Result<ConfChange> {
        if change == MemberChange::Remove(self.me) {
            return Err(common::Error::RemoveMaster { node: self.me.0 }.into());
        }
        self.catalog.write(|c| c.check_member_change(command))?;
        let mut cc = ConfChange::default();
        let (kind, node) = match change {
            MemberChange::Add(node) => (ConfChangeType::AddNode, node),
            MemberChange::Remove(node) => (ConfChangeType::RemoveNode, node),
        };
        cc.set_change_type(kind);
        cc.node_id = node.0;
        cc.context = data.into();
        Ok(cc)
    }

    /// Applies a committed configuration change to Raft, then to the catalog (the command it
    /// carries), and follows it in the transport.
    fn apply_conf_change(&mut self, entry: &Entry) -> Result<Output> {
        let cc = ConfChange::parse_from_bytes(&entry.data)
            .map_err(|e| Error::Corrupt(format!("undecodable configuration change: {e}")))?;
        let conf_state = self.node.apply_conf_change(&cc)?;
        self.storage.set_conf_state(&conf_state)?;
        self.snapshot_now = true;
        let command: Command = serde_json::from_slice(&cc.context)
            .map_err(|e| Error::Corrupt(format!("configuration change context: {e}")))?;
        tracing::info!(index = entry.index, voters = ?conf_state.voters, ?command, "membership changed");
        let out = self.catalog.apply(command)?;
        Ok(out)
    }

    /// Points the shared peer list and the transport at the catalog's members, once it has them.
    fn sync_members(&mut self) {
        let members = self.catalog.read(|c, _| c.member_addresses());
        if members.is_empty() {
            return;
        }
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        if *peers != members {
            *peers = members;
            self.transport.sync(&peers);
        }
    }

    async fn on_ready(&mut self) -> Result<()> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        for read in ready.take_read_states() {
            let id = read
                .request_ctx
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes);
            if let Some(tx) = id.and_then(|id| self.reads.remove(&id)) {
                let _ = tx.send(read.index);
            }
        }
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.storage.apply_snapshot(&snapshot)?;
            self.restore(&snapshot)?;
        }
        self.apply_committed(ready.take_committed_entries());
        let mut wrote = false;
        if !ready.entries().is_empty() {
            self.storage.append(ready.entries())?;
            wrote = true;
        }
        if let Some(hs) = ready.hs() {
            self.storage.set_hard_state(hs)?;
            wrote = true;
        }
        if wrote || ready.must_sync() {
            self.storage.sync().await?;
        }
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.storage.set_commit(commit)?;
        }
        self.transport.send(light.take_messages());
        self.apply_committed(light.take_committed_entries());
        self.node.advance_apply();
        self.sync_members();
        self.maybe_snapshot()?;
        self.publish_status();
        Ok(())
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<()> {
        let catalog: Catalog = if snapshot.data.is_empty() {
            Catalog::default()
        } else {
            serde_json::from_slice(&snapshot.data)
                .map_err(|e| Error::Corrupt(format!("snapshot catalog: {e}")))?
        };
        self.catalog.write(|c| *c = catalog);
        self.applied = snapshot.get_metadata().index;
        // Proposals the snapshot covers can no longer be matched to their entries.
        let covered: Vec<u64> = self
            .pending
            .keys()
            .copied()
            .filter(|i| *i <= self.applied)
            .collect();
        for index in covered {
            if let Some((_, tx)) = self.pending.remove(&index) {
                let _ = tx.send(Err(Error::CommitUnknown(
                    "a snapshot replaced the log before the write was seen applied".into(),
                )));
            }
        }
        tracing::info!(
            index = self.applied,
            "installed a catalog snapshot from the master"
        );
        Ok(())
    }

    fn apply_committed(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            self.applied = entry.index;
            if entry.data.is_empty() {
                // The no-op a new leader appends: it replaced whatever was proposed here.
                self.complete(entry.index, &entry.context, Err(Error::ProposalLost));
                continue;
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal => {}
                EntryType::EntryConfChange => {
                    let result = self.apply_conf_change(&entry);
                    if let Err(e) = &result {
                        tracing::error!(index = entry.index, "membership change: {e}");
                    }
                    self.complete(entry.index, &entry.context, result);
                    continue;
                }
                EntryType::EntryConfChangeV2 => {
                    tracing::warn!(index = entry.index, "ignoring a joint configuration change");
                    continue;
                }
            }
            let result = match serde_json::from_slice::<Command>(&entry.data) {
                Ok(command) => {
                    tracing::debug!(index = entry.index, ?command, "apply");
                    self.catalog.apply(command).map_err(Error::from)
                }
                Err(e) => {
                    tracing::error!(index = entry.index, "skipping undecodable command: {e}");
                    Err(Error::Corrupt(format!("undecodable command: {e}")))
                }
            };
            self.complete(entry.index, &entry.context, result);
        }
    }

    /// Answers the proposal appended at `index`, if this node made one. Another entry at that
    /// index means a new leader overwrote ours: it was certainly not applied.
    fn complete(&mut self, index: u64, context: &[u8], result: Result<Output>) {
        let Some((id, tx)) = self.pending.remove(&index) else {
            return;
        };
        let ours = parse_context(context) == Some((self.me, id));
        let _ = tx.send(if ours {
            result.map(|out| (out, index))
        } else {
            Err(Error::ProposalLost)
        });
    }

    /// Takes a snapshot every `snapshot_entries` applied entries. The driver only copies the
    /// catalog; encoding it (the costly part: the catalog holds the batch history) happens on a
    /// blocking thread, and the log is compacted when it comes back. Right after a membership
    /// change the snapshot is taken here and now, so that no master's log starts before it.
    fn maybe_snapshot(&mut self) -> Result<()> {
        if let Some(encoded) = self.encoded.take() {
            self.snapshot_in_flight = false;
            let Encoded {
                index,
                conf_state,
                data,
                took,
            } = *encoded;
            // A snapshot installed from the master meanwhile may already cover it.
            if index > self.storage.snapshot_index() {
                let data = data?;
                self.last_snapshot = (data.len() as u64, took.as_millis() as u64);
                self.storage.compact_to_snapshot(index, conf_state, data)?;
                tracing::info!(
                    index,
                    bytes = self.last_snapshot.0,
                    encode_ms = self.last_snapshot.1,
                    "took a catalog snapshot and compacted the raft log"
                );
            }
        }
        let since = self.applied.saturating_sub(self.storage.snapshot_index());
        if since == 0 {
            return Ok(());
        }
        if self.snapshot_now {
            self.snapshot_now = false;
            let started = std::time::Instant::now();
            let data = self
                .catalog
                .read(|c, _| serde_json::to_vec(c))
                .map_err(|e| Error::Corrupt(format!("encode catalog: {e}")))?;
            self.last_snapshot = (data.len() as u64, started.elapsed().as_millis() as u64);
            let conf_state = self.storage.conf_state();
            self.storage
                .compact_to_snapshot(self.applied, conf_state, data)?;
            tracing::info!(
                index = self.applied,
                bytes = self.last_snapshot.0,
                "took a catalog snapshot after a membership change and compacted the raft log"
            );
            return Ok(());
        }
        if since < self.snapshot_entries || self.snapshot_in_flight {
            return Ok(());
        }
        self.snapshot_in_flight = true;
        let catalog = self.catalog.read(|c, _| c.clone());
        let index = self.applied;
        let conf_state = self.storage.conf_state();
        let feedback = self.feedback.clone();
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let data = serde_json::to_vec(&catalog)
                .map_err(|e| Error::Corrupt(format!("encode catalog: {e}")));
            let encoded = Encoded {
                index,
                conf_state,
                data,
                took: started.elapsed(),
            };
            // A full inbox or a stopped driver: the next snapshot is due soon anyway.
            let _ = feedback.blocking_send(Input::SnapshotEncoded(Box::new(encoded)));
        });
        Ok(())
    }

    fn publish_status(&mut self) {
        let st = self.node.status();
        let leader = (st.ss.leader_id != raft::INVALID_ID).then_some(NodeId(st.ss.leader_id));
        let next = RaftStatus {
            node: self.me,
            leader,
            term: st.hs.term,
            role: role_name(st.ss.raft_state),
            applied: self.applied,
            snapshot_bytes: self.last_snapshot.0,
            snapshot_encode_ms: self.last_snapshot.1,
        };
        self.status.send_if_modified(|cur| {
            if *cur == next {
                return false;
            }
            if cur.leader != next.leader || cur.term != next.term {
                match next.leader {
                    Some(l) if l == self.me => {
                        tracing::info!(term = next.term, "this aggregator is now the master")
                    }
                    Some(l) => tracing::info!(term = next.term, leader = %l, "following master"),
                    None => tracing::info!(term = next.term, "no master aggregator"),
                }
            }
            *cur = next;
            true
        });
    }
}
