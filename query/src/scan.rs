//! The leaf end of a query plan: one table's committed rows on the leaf that runs the plan.
//!
//! The aggregator builds plans whose bottom node is a [`LeafScanExec`] and ships them to the
//! leaves ([`crate::fragment`]); a leaf decodes them with its store bound in as the
//! [`ScanSource`], and only there does the node run.

use crate::derive::Derived;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use std::fmt;
use std::sync::Arc;

/// Where a leaf's rows come from: its store.
pub trait ScanSource: fmt::Debug + Send + Sync {
    /// The committed rows of `scan` (projected, at most `scan.limit`), as record batches of
    /// `schema` (the projected columns, then one column per [`Derived`] value), read as the
    /// consumer pulls them. `predicate` (over `schema`) is the filter the
    /// plan applies right above the scan: rows it rejects may be left out (a source may skip
    /// storage by it), rows it keeps may not.
    fn scan(
        &self,
        scan: &proto::TableScan,
        derived: &[Derived],
        schema: SchemaRef,
        predicate: Option<Arc<dyn PhysicalExpr>>,
    ) -> Result<SendableRecordBatchStream>;
}

/// Reads one table's committed rows on a leaf.
#[derive(Debug)]
pub struct LeafScanExec {
    scan: proto::TableScan,
    /// Values the scan computes besides the columns (on the leaf only: never encoded).
    derived: Vec<Derived>,
    schema: SchemaRef,
    source: Option<Arc<dyn ScanSource>>,
    predicate: Option<Arc<dyn PhysicalExpr>>,
    properties: Arc<PlanProperties>,
}

impl LeafScanExec {
    /// The node for `scan`; its schema is the table's columns, projected.
    pub fn new(scan: proto::TableScan) -> Result<Self> {
        Self::with_derived(scan, vec![])
    }

    /// The node for `scan` that also computes `derived`, as columns after the projected ones.
    pub fn with_derived(scan: proto::TableScan, derived: Vec<Derived>) -> Result<Self> {
        let columns = crate::columns::from_proto(&scan.columns).map_err(DataFusionError::Plan)?;
        let full = common::arrow::table_schema(&columns);
        let projected = match &scan.projection {
            Some(p) => {
                let positions: Vec<usize> = p.columns.iter().map(|i| *i as usize).collect();
                full.project(&positions)?
            }
            None => (*full).clone(),
        };
        let mut fields: Vec<_> = projected.fields().iter().cloned().collect();
        fields.extend(derived.iter().map(|d| d.field.clone()));
        let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(fields));
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(Self {
            scan,
            derived,
            schema,
            source: None,
            predicate: None,
            properties,
        })
    }

    /// The table columns the scan reads (indexes into `scan.columns`), in output order.
    pub fn positions(&self) -> Vec<usize> {
        match &self.scan.projection {
            Some(p) => p.columns.iter().map(|i| *i as usize).collect(),
            None => (0..self.scan.columns.len()).collect(),
        }
    }

    pub fn derived(&self) -> &[Derived] {
        &self.derived
    }

    /// The source this node reads from, if bound.
    pub fn source(&self) -> Option<Arc<dyn ScanSource>> {
        self.source.clone()
    }

    /// The same node reading from `source` (a leaf's store).
    pub fn bound(mut self, source: Arc<dyn ScanSource>) -> Self {
        self.source = Some(source);
        self
    }

    pub fn table_scan(&self) -> &proto::TableScan {
        &self.scan
    }
}

/// Hands each scan the predicate of the filter right above it ([`ScanSource::scan`]).
pub fn attach_filters(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
    use datafusion::physical_plan::filter::FilterExec;
    plan.transform_up(|node| {
        let Some(filter) = node.downcast_ref::<FilterExec>() else {
            return Ok(Transformed::no(node));
        };
        let Some(scan) = filter.input().downcast_ref::<LeafScanExec>() else {
            return Ok(Transformed::no(node));
        };
        let scan = Arc::new(LeafScanExec {
            scan: scan.scan.clone(),
            derived: scan.derived.clone(),
            schema: scan.schema.clone(),
            source: scan.source.clone(),
            predicate: Some(filter.predicate().clone()),
            properties: scan.properties.clone(),
        });
        let node = node.replace_children(
            vec![scan],
            datafusion::physical_plan::execution_plan::ReplaceChildrenOptions::new(
                datafusion::physical_plan::execution_plan::ChildrenPropertiesMode::Keep,
            ),
        )?;
        Ok(Transformed::yes(node))
    })
    .data()
}

impl DisplayAs for LeafScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let s = &self.scan;
        write!(f, "LeafScanExec: {}.{}", s.database, s.table)?;
        if let Some(p) = &s.projection {
            write!(f, ", projection={:?}", p.columns)?;
        }
        if let Some(r) = &s.index_range {
            write!(f, ", index={}", r.index)?;
        }
        if let Some(l) = s.limit {
            write!(f, ", limit={l}")?;
        }
        for d in &self.derived {
            write!(f, ", derived {}", d.field.name())?;
        }
        Ok(())
    }
}

impl ExecutionPlan for LeafScanExec {
    fn name(&self) -> &str {
        "LeafScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "LeafScanExec has one partition, not {partition}"
            )));
        }
        match &self.source {
            Some(source) => source.scan(
                &self.scan,
                &self.derived,
                self.schema.clone(),
                self.predicate.clone(),
            ),
            None => Err(DataFusionError::Internal(
                "a leaf scan runs on a leaf, inside the plan the aggregator sent it".into(),
            )),
        }
    }
}
