//! `LeafServiceImpl`: the leaf's gRPC service; translation only.

use crate::membership::Membership;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct LeafServiceImpl {
    pub membership: Arc<Membership>,
}

#[tonic::async_trait]
impl proto::leaf_server::Leaf for LeafServiceImpl {
    async fn status(
        &self,
        _request: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::LeafStatusResponse>, Status> {
        let id = self.membership.leaf_id();
        Ok(Response::new(proto::LeafStatusResponse {
            leaf_id: id.unwrap_or(0),
            registered: id.is_some(),
        }))
    }
}
