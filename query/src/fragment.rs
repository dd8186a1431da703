//! Plan fragments: the part of a query plan a leaf runs, as datafusion-proto bytes.
//!
//! DataFusion plans on both ends: the aggregator plans the whole query and cuts it where the
//! leaves' part ends; datafusion-proto encodes that part (filters, projections, partial
//! aggregates, sorts with limits: DataFusion's own nodes) and [`Codec`] the one node of ours,
//! [`LeafScanExec`]. Functions travel by name and resolve in the leaf's registry, which
//! [`crate::session`] fills with the same [`crate::functions`] the aggregator uses.

use crate::scan::{LeafScanExec, ScanSource};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use prost::Message;
use std::sync::Arc;

/// Encodes and decodes [`LeafScanExec`] (as a `proto::TableScan`); on a leaf it binds the
/// decoded scan to the leaf's store.
#[derive(Debug, Default)]
pub struct Codec {
    source: Option<Arc<dyn ScanSource>>,
}

impl Codec {
    pub fn for_leaf(source: Arc<dyn ScanSource>) -> Self {
        Self {
            source: Some(source),
        }
    }
}

impl PhysicalExtensionCodec for Codec {
    fn try_decode(
        &self,
        buf: &[u8],
        _inputs: &[Arc<dyn ExecutionPlan>],
        _ctx: &TaskContext,
        _converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let scan = proto::TableScan::decode(buf)
            .map_err(|e| DataFusionError::Plan(format!("bad table scan in plan: {e}")))?;
        let exec = LeafScanExec::new(scan)?;
        Ok(Arc::new(match &self.source {
            Some(s) => exec.bound(s.clone()),
            None => exec,
        }))
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        _converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        let Some(scan) = node.downcast_ref::<LeafScanExec>() else {
            return Err(DataFusionError::NotImplemented(format!(
                "{} cannot run on a leaf",
                node.name()
            )));
        };
        scan.table_scan()
            .encode(buf)
            .map_err(|e| DataFusionError::Internal(format!("encoding a table scan: {e}")))
    }
}

/// The bytes of a fragment, for [`proto::QueryRequest::plan`].
pub fn encode(plan: Arc<dyn ExecutionPlan>) -> Result<Vec<u8>> {
    datafusion_proto::bytes::physical_plan_to_bytes_with_extension_codec(plan, &Codec::default())
        .map(|b| b.to_vec())
}

/// [`encode`] through `converter`, which may write some expressions in another form.
pub fn encode_with(
    plan: Arc<dyn ExecutionPlan>,
    converter: &dyn PhysicalProtoConverterExtension,
) -> Result<Vec<u8>> {
    datafusion_proto::bytes::physical_plan_to_bytes_with_proto_converter(
        plan,
        &Codec::default(),
        converter,
    )
    .map(|b| b.to_vec())
}

/// A fragment from its bytes, reading from `source`; functions resolve in `ctx`'s registry.
pub fn decode(
    bytes: &[u8],
    ctx: &TaskContext,
    source: Arc<dyn ScanSource>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let plan = datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec(
        bytes,
        ctx,
        &Codec::for_leaf(source),
    )?;
    crate::scan::attach_filters(plan)
}
