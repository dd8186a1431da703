//! Outbound Raft messages: one queue and one sending task per peer, so a slow or dead peer
//! never blocks the driver. Messages that cannot be queued or sent are dropped; Raft retries.

use super::driver::Input;
use common::ids::NodeId;
use proto::aggregator_client::AggregatorClient;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

const QUEUE: usize = 4096;
/// At most this many messages, or about this many bytes, per call to a peer.
const MAX_BATCH: usize = 256;
const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// Senders to every other aggregator.
pub struct Transport {
    me: NodeId,
    /// Per peer: its address and the queue of its sending task.
    peers: HashMap<u64, (String, mpsc::Sender<Message>)>,
    feedback: mpsc::Sender<Input>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Transport {
    /// Starts one sender task per peer (other than `me`). Unreachable peers and snapshot
    /// outcomes are reported back to the driver through `feedback`.
    pub fn start(
        me: NodeId,
        peers: &std::collections::BTreeMap<NodeId, String>,
        feedback: mpsc::Sender<Input>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let mut transport = Self {
            me,
            peers: HashMap::new(),
            feedback,
            tasks: tasks.clone(),
            shutdown,
        };
        transport.sync(peers);
        transport
    }

    /// Follows a membership change: starts senders to new members and stops those to members
    /// that left (their task ends when its queue closes).
    pub fn sync(&mut self, peers: &std::collections::BTreeMap<NodeId, String>) {
        self.peers
            .retain(|id, (addr, _)| peers.get(&NodeId(*id)) == Some(addr));
        for (id, addr) in peers.iter().filter(|(id, _)| **id != self.me) {
            if self.peers.contains_key(&id.0) {
                continue;
            }
            let (tx, rx) = mpsc::channel(QUEUE);
            self.peers.insert(id.0, (addr.clone(), tx));
            self.tasks.spawn(peer_loop(
                *id,
                addr.clone(),
                rx,
                self.feedback.clone(),
                self.shutdown.clone(),
            ));
        }
    }

    /// Queues messages for their peers without waiting.
    pub fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            if let Some((_, tx)) = self.peers.get(&m.to) {
                if tx.try_send(m).is_err() {
                    tracing::debug!("raft queue to a peer is full; dropping a message");
                }
            }
        }
    }
}

fn channel(addr: &str) -> Option<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).ok()?;
    Some(
        endpoint
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect_lazy(),
    )
}

async fn peer_loop(
    id: NodeId,
    addr: String,
    mut rx: mpsc::Receiver<Message>,
    feedback: mpsc::Sender<Input>,
    shutdown: CancellationToken,
) {
    let Some(ch) = channel(&addr) else {
        tracing::error!(peer = %id, %addr, "invalid peer address; raft messages to it are dropped");
        return;
    };
    let mut client = AggregatorClient::new(ch)
        .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(proto::MAX_MESSAGE_BYTES);
    let mut was_down = false;
    // A snapshot met while batching waits for the next call: it travels alone.
    let mut carry: Option<Message> = None;
    loop {
        let first = match carry.take() {
            Some(m) => m,
            None => tokio::select! {
                _ = shutdown.cancelled() => return,
                m = rx.recv() => match m { Some(m) => m, None => return },
            },
        };
        let is_snapshot = first.get_msg_type() == MessageType::MsgSnapshot;
        // What queued up while the previous call was in flight goes in this one: one round
        // trip (and one fsync on the peer) for many appends instead of one each.
        let mut batch = vec![first];
        let mut bytes_in_batch = 0usize;
        while !is_snapshot && batch.len() < MAX_BATCH && bytes_in_batch < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(m) if m.get_msg_type() == MessageType::MsgSnapshot => {
                    carry = Some(m);
                    break;
                }
                Ok(m) => {
                    bytes_in_batch += m.compute_size() as usize;
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        let encoded: Result<Vec<Vec<u8>>, _> = batch.iter().map(|m| m.write_to_bytes()).collect();
        let mut encoded = match encoded {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(peer = %id, "cannot encode raft message: {e}");
                continue;
            }
        };
        let message = encoded.remove(0);
        let result = client
            .raft(proto::RaftMessage {
                message,
                more: encoded,
            })
            .await;
        match result {
            Ok(_) => {
                if was_down {
                    tracing::info!(peer = %id, %addr, "aggregator reachable again");
                    was_down = false;
                }
                if is_snapshot {
                    let _ = feedback.try_send(Input::SnapshotSent { to: id.0, ok: true });
                }
            }
            Err(status) => {
                if !was_down {
                    tracing::warn!(peer = %id, %addr, "aggregator unreachable: {}", status.message());
                    was_down = true;
                }
                let _ = feedback.try_send(Input::Unreachable { to: id.0 });
                if is_snapshot {
                    let _ = feedback.try_send(Input::SnapshotSent {
                        to: id.0,
                        ok: false,
                    });
                }
                // Drop what piled up while the peer was down; Raft will resend what matters.
                while rx.try_recv().is_ok() {}
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
}
