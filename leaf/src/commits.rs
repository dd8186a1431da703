//! `Committer`: the leaf's one way to ask the master to commit prepared batches. The tasks of a
//! leaf hand their batches to it, and it sends the batches that are waiting together in one
//! `CommitBatches` call (group commit at the RPC layer; each batch is still its own Raft
//! entry with its own outcome). A few calls may be in flight at once; batches that arrive
//! while they are pile up for the next call.

use crate::client::{CallError, MasterClient};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Mutex};

/// Calls in flight at once. One call holds every batch that was waiting when it was sent, so
/// more than a few only splits groups; two or more keep the master busy while a reply travels.
pub const CALLS_IN_FLIGHT: usize = 4;

/// Batches in one call at most (a call stays far below the gRPC message limit: a batch is a
/// few hundred bytes per source partition).
pub const MAX_BATCHES_PER_CALL: usize = 256;

struct Pending {
    batch: proto::BatchCommit,
    reply: oneshot::Sender<Result<proto::BatchOutcome, CallError>>,
}

/// Clones share the queue and the calls.
#[derive(Clone)]
pub struct Committer {
    queue: mpsc::Sender<Pending>,
}

impl Committer {
    /// Starts `calls_in_flight` senders on the current runtime, each sending up to
    /// `per_call` batches a call; they stop when the last clone is dropped.
    pub fn start(client: MasterClient, calls_in_flight: usize, per_call: usize) -> Self {
        let (calls_in_flight, per_call) = (calls_in_flight.max(1), per_call.max(1));
        let (queue, rx) = mpsc::channel(per_call * calls_in_flight);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..calls_in_flight {
            // Each sender follows leader hints with its own client (sharing the connection).
            tokio::spawn(send_loop(rx.clone(), client.clone(), per_call));
        }
        Self { queue }
    }

    /// Asks the master to commit one batch. `Err`, or an outcome of status `Unknown`: the
    /// batch may or may not have committed; ask again (commits are idempotent).
    pub async fn commit(
        &self,
        batch: proto::BatchCommit,
    ) -> Result<proto::BatchOutcome, CallError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || CallError::Unreachable("the leaf's committer stopped".into());
        self.queue
            .send(Pending { batch, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Takes every batch waiting (at least one), sends them in one call, hands out the outcomes.
async fn send_loop(
    queue: Arc<Mutex<mpsc::Receiver<Pending>>>,
    mut client: MasterClient,
    per_call: usize,
) {
    loop {
        let group = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut group = vec![first];
            while group.len() < per_call {
                match queue.try_recv() {
                    Ok(p) => group.push(p),
                    Err(_) => break,
                }
            }
            group
        };
        let (bodies, replies): (Vec<_>, Vec<_>) =
            group.into_iter().map(|p| (p.batch, p.reply)).unzip();
        let request = proto::CommitBatchesRequest { batches: bodies };
        let result = client
            .call(|mut c| {
                let request = request.clone();
                async move { c.commit_batches(request).await }
            })
            .await;
        hand_out(result, replies);
    }
}

/// Gives each waiting batch its outcome: the call's error to all of them, or its own outcome
/// (a missing one reads as unknown).
fn hand_out(
    result: Result<proto::CommitBatchesResponse, CallError>,
    replies: Vec<oneshot::Sender<Result<proto::BatchOutcome, CallError>>>,
) {
    match result {
        Ok(response) => {
            let mut outcomes = response.outcomes.into_iter();
            for reply in replies {
                let outcome = outcomes.next().unwrap_or_else(|| proto::BatchOutcome {
                    status: proto::BatchStatus::Unknown as i32,
                    batch_id: 0,
                    reason: "the master sent fewer outcomes than batches".into(),
                });
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.duplicate()));
            }
        }
    }
}

/// The wire form of a batch's commit.
pub fn to_proto(c: &common::catalog::pipelines::BatchCommit) -> proto::BatchCommit {
    proto::BatchCommit {
        pipeline_id: c.pipeline_id,
        task_id: c.task_id,
        epoch: c.epoch,
        seq: c.seq,
        offsets: c
            .offsets
            .iter()
            .map(|o| proto::OffsetUpdate {
                key: o.key.clone(),
                from_json: o.from.as_ref().map(|v| v.to_string()),
                to_json: o.to.to_string(),
                finished: o.finished,
                continues: o.continues.clone(),
            })
            .collect(),
        start_ms: c.start_ms,
        extractor_wait_ms: c.extractor_wait_ms,
        batch_time_ms: c.batch_time_ms,
        rows: c.rows,
        bytes: c.bytes,
        num_partitions: c.num_partitions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(status: proto::BatchStatus, batch_id: u64) -> proto::BatchOutcome {
        proto::BatchOutcome {
            status: status as i32,
            batch_id,
            reason: String::new(),
        }
    }

    #[tokio::test]
    async fn each_batch_gets_its_own_outcome_and_missing_ones_are_unknown() {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..3).map(|_| oneshot::channel()).unzip();
        let response = proto::CommitBatchesResponse {
            outcomes: vec![
                outcome(proto::BatchStatus::Committed, 7),
                outcome(proto::BatchStatus::Refused, 0),
            ],
        };
        hand_out(Ok(response), txs);
        let mut got = Vec::new();
        for rx in rxs {
            got.push(rx.await.unwrap().unwrap());
        }
        assert_eq!(got[0].status(), proto::BatchStatus::Committed);
        assert_eq!(got[0].batch_id, 7);
        assert_eq!(got[1].status(), proto::BatchStatus::Refused);
        assert_eq!(got[2].status(), proto::BatchStatus::Unknown);
    }

    #[tokio::test]
    async fn a_failed_call_fails_every_batch_in_it() {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..2).map(|_| oneshot::channel()).unzip();
        hand_out(
            Err(CallError::Rejected(tonic::Status::invalid_argument("bad"))),
            txs,
        );
        for rx in rxs {
            match rx.await.unwrap() {
                Err(CallError::Rejected(s)) => {
                    assert_eq!(s.code(), tonic::Code::InvalidArgument);
                    assert_eq!(s.message(), "bad");
                }
                other => panic!("expected the call's error, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn with_no_master_reachable_a_commit_fails_instead_of_hanging() {
        // Port 1 on localhost refuses connections at once.
        let committer = Committer::start(MasterClient::new(vec!["127.0.0.1:1".into()]), 2, 8);
        let result = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            committer.commit(proto::BatchCommit::default()),
        )
        .await
        .expect("the commit call hung");
        assert!(
            matches!(result, Err(CallError::Unreachable(_))),
            "{result:?}"
        );
    }
}
