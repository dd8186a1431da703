//! `LeafServiceImpl`: the leaf's gRPC service; translation only.

use crate::membership::Membership;
use crate::store::{Store, TableRef};
use common::connect::{self, ConnectError, ConnectorConfig};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct LeafServiceImpl {
    pub membership: Arc<Membership>,
    pub store: Store,
    pub metrics: Arc<common::metrics::Metrics>,
}

fn connect_status(e: ConnectError) -> Status {
    match e {
        ConnectError::Config(m) => Status::invalid_argument(m),
        ConnectError::Source(m) => Status::unavailable(m),
    }
}

#[tonic::async_trait]
impl proto::leaf_server::Leaf for LeafServiceImpl {
    async fn status(
        &self,
        _request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::LeafStatusResponse>, Status> {
        let id = self.membership.leaf_id();
        let prepared = self
            .store
            .prepared_batches()
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(proto::LeafStatusResponse {
            leaf_id: id.unwrap_or(0),
            registered: id.is_some(),
            prepared_batches: prepared.len() as u32,
            stored_tables: self.store.stored_tables(),
        }))
    }

    async fn segments(
        &self,
        _request: Request<proto::SegmentsRequest>,
    ) -> Result<Response<proto::SegmentsResponse>, Status> {
        let mut segments = Vec::new();
        for part in self.store.manifests() {
            let m = &part.manifest;
            let table_id = m
                .tree
                .strip_prefix("table/")
                .and_then(|id| id.parse().ok())
                .unwrap_or(0);
            for s in &m.segments {
                segments.push(proto::SegmentInfo {
                    table_id,
                    tree: m.tree.clone(),
                    partition: m.partition,
                    segment_id: s.id,
                    rows: s.rows,
                    bytes: s.bytes,
                    columns: s
                        .columns
                        .iter()
                        .map(|c| proto::SegmentColumn {
                            name: c.name.clone(),
                            min_json: c.min.as_ref().map(ToString::to_string),
                            max_json: c.max.as_ref().map(ToString::to_string),
                            nulls: c.nulls,
                        })
                        .collect(),
                    json: s
                        .json
                        .iter()
                        .map(|j| proto::SegmentJsonPath {
                            column: j.source.clone(),
                            path: j.path.clone(),
                            r#type: j.ty.sql().to_string(),
                            present: j.present,
                        })
                        .collect(),
                });
            }
        }
        Ok(Response::new(proto::SegmentsResponse { segments }))
    }

    async fn wake(
        &self,
        _request: Request<proto::WakeRequest>,
    ) -> Result<Response<proto::WakeResponse>, Status> {
        self.membership.wake();
        Ok(Response::new(proto::WakeResponse {}))
    }

    async fn plan_tasks(
        &self,
        request: Request<proto::PlanTasksRequest>,
    ) -> Result<Response<proto::PlanTasksResponse>, Status> {
        let req = request.into_inner();
        let config: ConnectorConfig = serde_json::from_str(&req.config_json)
            .map_err(|e| Status::invalid_argument(format!("CONFIG is not a JSON object: {e}")))?;
        let class = connect::required(&config, "connector.class").map_err(connect_status)?;
        let connector = connect::connector(&class).map_err(connect_status)?;
        connector.validate(&config).map_err(connect_status)?;
        let tasks = connector
            .task_configs(&config, req.max_tasks.max(1) as usize)
            .await
            .map_err(connect_status)?;
        let task_configs_json = tasks
            .iter()
            .map(|t| serde_json::to_string(t).unwrap_or_default())
            .collect();
        Ok(Response::new(proto::PlanTasksResponse {
            task_configs_json,
        }))
    }

    type QueryStream = crate::query::Messages;

    async fn query(
        &self,
        request: Request<proto::QueryRequest>,
    ) -> Result<Response<Self::QueryStream>, Status> {
        if !self.membership.recovered() {
            // Rows of batches the master may have committed are still hidden: an answer now
            // could be short.
            return Err(Status::unavailable(
                "the leaf is restarting: it is settling the batches it had prepared",
            ));
        }
        let messages = crate::query::run(
            &request.into_inner().plan,
            self.store.clone(),
            self.metrics.clone(),
        )?;
        Ok(Response::new(messages))
    }

    async fn backfill(
        &self,
        request: Request<proto::BackfillRequest>,
    ) -> Result<Response<proto::BackfillResponse>, Status> {
        let req = request.into_inner();
        let crate::tasks::TableDef { columns, compiled } =
            crate::tasks::TableDef::from_proto(&req.columns).map_err(Status::invalid_argument)?;
        let store = self.store.clone();
        let table = TableRef::new(req.table_id, &req.database, &req.table);
        store
            .note_columns(&table, &columns)
            .map_err(|e| Status::internal(e.to_string()))?;
        let rows_updated = tokio::task::spawn_blocking(move || {
            store.backfill(
                &TableRef::new(req.table_id, &req.database, &req.table),
                |row| common::expr::complete_row(row, &columns, &compiled),
                columns.len(),
            )
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(proto::BackfillResponse { rows_updated }))
    }

    async fn build_index(
        &self,
        request: Request<proto::BuildIndexRequest>,
    ) -> Result<Response<proto::BuildIndexResponse>, Status> {
        let r = request.into_inner();
        let columns = query::columns::from_proto(&r.columns).map_err(Status::invalid_argument)?;
        let store = self.store.clone();
        let rows_indexed = tokio::task::spawn_blocking(move || {
            store.build_index(
                &TableRef::new(r.table_id, &r.database, &r.table),
                &r.index,
                r.position as usize,
                &columns,
            )
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(proto::BuildIndexResponse { rows_indexed }))
    }

    async fn drop_index(
        &self,
        request: Request<proto::DropIndexRequest>,
    ) -> Result<Response<proto::DropIndexResponse>, Status> {
        let r = request.into_inner();
        self.store
            .drop_index(&TableRef::new(r.table_id, &r.database, &r.table), &r.index)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(proto::DropIndexResponse {}))
    }

    async fn test_pipeline(
        &self,
        request: Request<proto::TestPipelineRequest>,
    ) -> Result<Response<proto::TestPipelineResponse>, Status> {
        let req = request.into_inner();
        let rows_json =
            crate::tasks::test_extract(&req.config_json, &req.offsets, req.limit.max(1) as usize)
                .await
                .map_err(Status::failed_precondition)?;
        Ok(Response::new(proto::TestPipelineResponse { rows_json }))
    }
}
