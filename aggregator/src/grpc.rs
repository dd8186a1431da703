//! `AggregatorServiceImpl`: translates gRPC calls into calls on the Raft handle and the leaf
//! monitor. No logic lives here.

use crate::cluster::{batches, LeafMonitor};
use crate::raft::RaftHandle;
use common::ids::LeafId;
use protobuf::Message as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct AggregatorServiceImpl {
    pub raft: RaftHandle,
    pub leaves: Arc<LeafMonitor>,
    pub connections: Arc<AtomicUsize>,
    pub mysql_address: String,
    pub metrics: Arc<common::metrics::Metrics>,
}

impl AggregatorServiceImpl {
    /// Commits one batch of a `CommitBatches` call; its outcome does not depend on the others'.
    async fn commit_one(&self, batch: proto::BatchCommit) -> proto::BatchOutcome {
        let outcome = |status: proto::BatchStatus, batch_id, reason| proto::BatchOutcome {
            status: status as i32,
            batch_id,
            reason,
        };
        let batch = match batch_commit(batch) {
            Ok(b) => b,
            Err(e) => {
                return outcome(proto::BatchStatus::Invalid, 0, format!("bad batch: {e}"));
            }
        };
        let rows = batch.rows;
        match batches::commit(&self.raft, batch).await {
            Ok(Ok(batch_id)) => {
                self.metrics.add("shardline_batches_committed_total", 1.0);
                self.metrics
                    .add("shardline_rows_committed_total", rows as f64);
                outcome(proto::BatchStatus::Committed, batch_id, String::new())
            }
            Ok(Err(reason)) => outcome(proto::BatchStatus::Refused, 0, reason),
            Err(e) => outcome(proto::BatchStatus::Unknown, 0, e.to_string()),
        }
    }
}

/// A batch's commit from its wire form; offsets that are not JSON make it invalid.
fn batch_commit(b: proto::BatchCommit) -> Result<common::catalog::pipelines::BatchCommit, String> {
    let json = |text: &str| {
        serde_json::from_str(text).map_err(|e| format!("an offset is not JSON ({e}): {text:?}"))
    };
    let offsets = b
        .offsets
        .into_iter()
        .map(|o| {
            Ok(common::catalog::pipelines::OffsetUpdate {
                from: o.from_json.as_deref().map(json).transpose()?,
                to: json(&o.to_json)?,
                key: o.key,
                finished: o.finished,
                continues: o.continues,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(common::catalog::pipelines::BatchCommit {
        pipeline_id: b.pipeline_id,
        task_id: b.task_id,
        epoch: b.epoch,
        seq: b.seq,
        offsets,
        start_ms: b.start_ms,
        extractor_wait_ms: b.extractor_wait_ms,
        batch_time_ms: b.batch_time_ms,
        rows: b.rows,
        bytes: b.bytes,
        num_partitions: b.num_partitions,
    })
}

#[tonic::async_trait]
impl proto::aggregator_server::Aggregator for AggregatorServiceImpl {
    async fn identity(
        &self,
        _request: Request<proto::IdentityRequest>,
    ) -> Result<Response<proto::IdentityResponse>, Status> {
        let cluster_id = self.raft.read_catalog(|c| c.cluster_id.clone());
        Ok(Response::new(proto::IdentityResponse {
            node_id: self.raft.node_id().0,
            cluster_id: cluster_id.unwrap_or_default(),
            started: self.raft.launched(),
        }))
    }

    async fn join_cluster(
        &self,
        request: Request<proto::JoinClusterRequest>,
    ) -> Result<Response<proto::JoinClusterResponse>, Status> {
        let req = request.into_inner();
        if !self.raft.launched() {
            return Err(Status::unavailable("this aggregator is starting"));
        }
        let node = common::ids::NodeId(req.node_id);
        let command = common::catalog::Command::Request {
            id: req.request_id,
            command: Box::new(common::catalog::Command::JoinMember { node }),
        };
        match self.raft.propose(command).await {
            Ok(common::catalog::Output::Cluster(cluster_id)) => {
                tracing::info!(%node, "an aggregator joined with a new data directory");
                Ok(Response::new(proto::JoinClusterResponse { cluster_id }))
            }
            Ok(other) => Err(Status::internal(format!(
                "unexpected join outcome {other:?}"
            ))),
            Err(crate::Error::Catalog(
                e @ (common::Error::NotAMember { .. } | common::Error::ClusterNotInitialized),
            )) => Err(Status::not_found(e.to_string())),
            Err(e @ crate::Error::Catalog(_)) => {
                tracing::warn!(%node, "refused an aggregator's join: {e}");
                Err(Status::failed_precondition(e.to_string()))
            }
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn raft(
        &self,
        request: Request<proto::RaftMessage>,
    ) -> Result<Response<proto::RaftAck>, Status> {
        let request = request.into_inner();
        for bytes in std::iter::once(&request.message).chain(&request.more) {
            let msg = raft::eraftpb::Message::parse_from_bytes(bytes)
                .map_err(|e| Status::invalid_argument(format!("bad raft message: {e}")))?;
            self.raft.step(msg);
        }
        Ok(Response::new(proto::RaftAck {}))
    }

    async fn propose(
        &self,
        request: Request<proto::ProposeRequest>,
    ) -> Result<Response<proto::ProposeResponse>, Status> {
        let command: common::catalog::Command =
            serde_json::from_slice(&request.into_inner().command)
                .map_err(|e| Status::invalid_argument(format!("bad command: {e}")))?;
        let (result, index) = self.raft.serve_forwarded(command).await?;
        let result = serde_json::to_vec(&result).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(proto::ProposeResponse { result, index }))
    }

    async fn register_leaf(
        &self,
        request: Request<proto::RegisterLeafRequest>,
    ) -> Result<Response<proto::RegisterLeafResponse>, Status> {
        let req = request.into_inner();
        let address = req.address;
        crate::config::check_host_port(&address)
            .map_err(|e| Status::invalid_argument(format!("leaf address '{address}': {e}")))?;
        let holding = req.fresh.then(|| {
            req.holding
                .iter()
                .map(|b| common::catalog::pipelines::BatchRef {
                    pipeline_id: b.pipeline_id,
                    task_id: b.task_id,
                    epoch: b.epoch,
                    seq: b.seq,
                })
                .collect()
        });
        let id = self.leaves.register(address, holding).await?;
        Ok(Response::new(proto::RegisterLeafResponse { leaf_id: id.0 }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let leaf = LeafId(req.leaf_id);
        self.leaves.heartbeat(leaf).await?;
        let seen: batches::OffsetsSeen = req
            .offsets_seen
            .iter()
            .map(|s| (s.pipeline_id, (s.generation, s.batch_id)))
            .collect();
        let (tasks, live_tables) = self.raft.read_catalog(|c| {
            (
                batches::assignments(c, leaf, &seen),
                batches::live_tables(c, req.tables_generation),
            )
        });
        Ok(Response::new(proto::HeartbeatResponse {
            leader_node_id: self.raft.node_id().0,
            tasks,
            live_tables,
            aggregators: self.raft.peers().into_values().collect(),
        }))
    }

    async fn status(
        &self,
        _request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusResponse>, Status> {
        let st = self.raft.status();
        Ok(Response::new(proto::StatusResponse {
            node_id: st.node.0,
            leader_node_id: st.leader.map_or(0, |l| l.0),
            term: st.term,
            applied_index: st.applied,
            role: st.role.to_string(),
            leader_address: self.raft.leader_address().unwrap_or_default(),
            open_connections: self.connections.load(Ordering::Relaxed) as u64,
            unfinalized_batches: self.raft.read_catalog(|c| c.unfinalized.len() as u64),
            mysql_address: self.mysql_address.clone(),
        }))
    }

    async fn commit_batches(
        &self,
        request: Request<proto::CommitBatchesRequest>,
    ) -> Result<Response<proto::CommitBatchesResponse>, Status> {
        if !self.raft.is_leader() {
            return Err(self.raft.not_leader().into());
        }
        // Proposed together, the batches share Raft readies (one replication and one fsync).
        let outcomes = futures::future::join_all(
            request
                .into_inner()
                .batches
                .into_iter()
                .map(|b| self.commit_one(b)),
        )
        .await;
        Ok(Response::new(proto::CommitBatchesResponse { outcomes }))
    }

    async fn resolve_batch(
        &self,
        request: Request<proto::ResolveBatchRequest>,
    ) -> Result<Response<proto::ResolveBatchResponse>, Status> {
        let r = request.into_inner();
        let outcome =
            batches::resolve(&self.raft, r.pipeline_id, r.task_id, r.epoch, r.seq).await?;
        Ok(Response::new(proto::ResolveBatchResponse {
            committed: outcome.is_some(),
            batch_id: outcome.unwrap_or(0),
        }))
    }

    async fn confirm_finalized(
        &self,
        request: Request<proto::ConfirmFinalizedRequest>,
    ) -> Result<Response<proto::ConfirmFinalizedResponse>, Status> {
        let batches = request
            .into_inner()
            .batches
            .into_iter()
            .map(|b| common::catalog::pipelines::BatchRef {
                pipeline_id: b.pipeline_id,
                task_id: b.task_id,
                epoch: b.epoch,
                seq: b.seq,
            })
            .collect();
        batches::finalized(&self.raft, batches).await?;
        Ok(Response::new(proto::ConfirmFinalizedResponse {}))
    }

    async fn report_task_error(
        &self,
        request: Request<proto::TaskErrorRequest>,
    ) -> Result<Response<proto::TaskErrorResponse>, Status> {
        batches::report_error(&self.raft, request.into_inner()).await?;
        Ok(Response::new(proto::TaskErrorResponse {}))
    }
}
