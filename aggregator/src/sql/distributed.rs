//! Tables whose rows live on the leaves, and the part of a query that runs there.
//!
//! [`ClusterTable`] is the table DataFusion plans against; its scan is a [`ClusterScanExec`]:
//! one output partition per leaf holding the table's partitions, each a stream of record
//! batches from that leaf. [`PushToLeaves`] then moves the operators that work partition by
//! partition (filters, projections, partial aggregates, per-partition sorts and limits) from
//! above the scan into the plan fragment the leaves run, so rows are filtered, cut down and
//! aggregated where they are stored and only what the query needs crosses the network.

use crate::cluster::leaf_client;
use datafusion::arrow::array::{RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::{Session as DfSession, TableProvider};
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::config::ConfigOptions;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::limit::{GlobalLimitExec, LocalLimitExec};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties,
};
use datafusion::scalar::ScalarValue;
use futures::TryStreamExt;
use query::scan::LeafScanExec;
use std::fmt;
use std::sync::{Arc, OnceLock};

/// A table whose rows live on leaves: a scan asks every leaf holding its partitions.
#[derive(Debug)]
pub struct ClusterTable {
    pub database: String,
    pub table: String,
    /// The catalog's id of the table (the leaves store its rows under it).
    pub table_id: u64,
    pub schema: SchemaRef,
    /// The catalog's columns, so leaves can fill computed columns.
    pub columns: Vec<proto::Column>,
    /// Secondary indexes: (index name, column).
    pub indexes: Vec<(String, String)>,
    /// (leaf address, online, partitions on it).
    pub leaves: Vec<(String, bool, Vec<u32>)>,
}

#[async_trait::async_trait]
impl TableProvider for ClusterTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Filters on indexed columns tell the leaves which rows to read; every filter is still
        // applied above the scan (Inexact), and that filter runs on the leaves too
        // ([`PushToLeaves`]), so a leaf without the index stays correct.
        Ok(filters
            .iter()
            .map(|f| {
                if self.index_bound(f).is_some() || self.index_bound_to_come(f) {
                    TableProviderFilterPushDown::Inexact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        _state: &dyn DfSession,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if let Some((addr, _, parts)) = self.leaves.iter().find(|(_, online, _)| !online) {
            return Err(DataFusionError::Execution(format!(
                "partitions {parts:?} of database '{}' are on leaf {addr}, which is offline; the result would be incomplete",
                self.database
            )));
        }
        // One index; every pushed-down bound on it narrows the range (AND of filters).
        let bounds: Vec<proto::IndexRange> =
            filters.iter().filter_map(|f| self.index_bound(f)).collect();
        let index_range = bounds.first().map(|first| {
            let mut r = first.clone();
            for b in bounds.iter().skip(1).filter(|b| b.index == first.index) {
                if r.lower_json.is_none() && b.lower_json.is_some() {
                    r.lower_json = b.lower_json.clone();
                    r.lower_inclusive = b.lower_inclusive;
                }
                if r.upper_json.is_none() && b.upper_json.is_some() {
                    r.upper_json = b.upper_json.clone();
                    r.upper_inclusive = b.upper_inclusive;
                }
            }
            r
        });
        let scan = proto::TableScan {
            database: self.database.clone(),
            table: self.table.clone(),
            table_id: self.table_id,
            columns: self.columns.clone(),
            index_range,
            projection: projection.map(|p| proto::Projection {
                columns: p.iter().map(|i| *i as u32).collect(),
            }),
            limit: limit.map(|l| l as u64),
        };
        let fragment: Arc<dyn ExecutionPlan> = Arc::new(LeafScanExec::new(scan)?);
        let leaves: Vec<String> = self.leaves.iter().map(|(a, _, _)| a.clone()).collect();
        if leaves.is_empty() {
            return Ok(Arc::new(EmptyExec::new(fragment.schema())));
        }
        Ok(Arc::new(ClusterScanExec::new(fragment, leaves)))
    }
}

impl ClusterTable {
    /// Whether `f` is `column <op> $n` that becomes an index range once a value of the
    /// placeholder's type is bound (a plan kept for its shape, [`super::plans`]): the filter
    /// stays on the scan, so the bound statement's scan gets its range.
    fn index_bound_to_come(&self, f: &Expr) -> bool {
        use datafusion::logical_expr::expr::Placeholder;
        use datafusion::logical_expr::BinaryExpr;
        let Expr::BinaryExpr(BinaryExpr { left, op, right }) = f else {
            return false;
        };
        let some_value = |e: &Expr| match e {
            Expr::Placeholder(Placeholder {
                field: Some(field), ..
            }) => match field.data_type() {
                DataType::Int64 => Some(Expr::Literal(ScalarValue::Int64(Some(0)), None)),
                DataType::Utf8 => Some(Expr::Literal(ScalarValue::Utf8(Some(String::new())), None)),
                _ => None,
            },
            _ => None,
        };
        let bound = match (some_value(left), some_value(right)) {
            (Some(v), None) => BinaryExpr::new(Box::new(v), *op, right.clone()),
            (None, Some(v)) => BinaryExpr::new(left.clone(), *op, Box::new(v)),
            _ => return false,
        };
        self.index_bound(&Expr::BinaryExpr(bound)).is_some()
    }

    /// An index range for `column <op> literal` (either side) on an indexed column.
    fn index_bound(&self, f: &Expr) -> Option<proto::IndexRange> {
        use datafusion::logical_expr::{BinaryExpr, Operator};
        let Expr::BinaryExpr(BinaryExpr { left, op, right }) = f else {
            return None;
        };
        let (col, lit, op) = match (left.as_ref(), right.as_ref()) {
            (Expr::Column(c), Expr::Literal(v, _)) => (c, v, *op),
            (Expr::Literal(v, _), Expr::Column(c)) => (c, v, op.swap()?),
            _ => return None,
        };
        let (index, _) = self
            .indexes
            .iter()
            .find(|(_, column)| column.eq_ignore_ascii_case(&col.name))?;
        let field = self.schema.field_with_name(&col.name).ok()?;
        let value = match (lit, field.data_type()) {
            (ScalarValue::Int64(Some(v)), DataType::Int64) => serde_json::json!(v),
            (ScalarValue::Int32(Some(v)), DataType::Int64) => serde_json::json!(v),
            (ScalarValue::Utf8(Some(v)), DataType::Utf8) => serde_json::json!(v),
            _ => return None,
        }
        .to_string();
        let (lower, upper) = match op {
            Operator::Eq => (Some((value.clone(), true)), Some((value, true))),
            Operator::Gt => (Some((value, false)), None),
            Operator::GtEq => (Some((value, true)), None),
            Operator::Lt => (None, Some((value, false))),
            Operator::LtEq => (None, Some((value, true))),
            _ => return None,
        };
        Some(proto::IndexRange {
            index: index.clone(),
            lower_inclusive: lower.as_ref().is_some_and(|l| l.1),
            lower_json: lower.map(|l| l.0),
            upper_inclusive: upper.as_ref().is_some_and(|u| u.1),
            upper_json: upper.map(|u| u.0),
        })
    }
}

/// Runs `fragment` on each leaf; output partition `i` is what leaf `i` streams back.
#[derive(Debug)]
pub struct ClusterScanExec {
    fragment: Arc<dyn ExecutionPlan>,
    leaves: Vec<String>,
    properties: Arc<PlanProperties>,
    /// A statement's values, in a copy of a plan kept for its shape ([`super::params`]).
    values: Option<Arc<Vec<ScalarValue>>>,
    encoded: OnceLock<Result<Arc<Vec<u8>>, String>>,
}

impl ClusterScanExec {
    fn new(fragment: Arc<dyn ExecutionPlan>, leaves: Vec<String>) -> Self {
        // Each leaf's stream has the fragment's properties (a sorted fragment gives sorted
        // streams), one partition per leaf.
        let properties = Arc::new(
            fragment
                .properties()
                .as_ref()
                .clone()
                .with_partitioning(Partitioning::UnknownPartitioning(leaves.len())),
        );
        Self {
            fragment,
            leaves,
            properties,
            values: None,
            encoded: OnceLock::new(),
        }
    }

    /// This scan for one statement of a kept plan's shape: its fragment's parameters are
    /// `values`.
    pub fn with_values(&self, values: Arc<Vec<ScalarValue>>) -> Self {
        Self {
            fragment: self.fragment.clone(),
            leaves: self.leaves.clone(),
            properties: self.properties.clone(),
            values: Some(values),
            encoded: OnceLock::new(),
        }
    }

    /// The plan bytes every leaf gets.
    fn encoded(&self) -> Result<Arc<Vec<u8>>> {
        self.encoded
            .get_or_init(|| {
                let values = self.values.as_deref().map_or(&[][..], Vec::as_slice);
                query::fragment::encode_with(self.fragment.clone(), &super::params::Bind { values })
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(DataFusionError::Internal)
    }
}

impl DisplayAs for ClusterScanExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "ClusterScanExec: {} leaves, on each: ",
            self.leaves.len()
        )?;
        let mut node = self.fragment.clone();
        loop {
            node.fmt_as(t, f)?;
            let Some(child) = node.children().first().map(|c| Arc::clone(c)) else {
                return Ok(());
            };
            write!(f, " <- ")?;
            node = child;
        }
    }
}

impl ExecutionPlan for ClusterScanExec {
    fn name(&self) -> &str {
        "ClusterScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn schema(&self) -> SchemaRef {
        self.fragment.schema()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        // The fragment runs elsewhere: no optimizer on this side may rewrite it.
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
        let addr = self.leaves.get(partition).cloned().ok_or_else(|| {
            DataFusionError::Internal(format!("no leaf for partition {partition}"))
        })?;
        let plan = self.encoded()?;
        let schema = self.schema();
        let batches = {
            let schema = schema.clone();
            async move {
                let mut client =
                    leaf_client::query_client(&addr).map_err(DataFusionError::Execution)?;
                let stream = client
                    .query(proto::QueryRequest {
                        plan: plan.as_ref().clone(),
                    })
                    .await
                    .map_err(|s| leaf_error(&addr, &s))?
                    .into_inner();
                Ok::<_, DataFusionError>(leaf_batches(addr, schema, stream))
            }
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            futures::stream::once(batches).try_flatten(),
        )))
    }
}

/// The record batches of a leaf's result stream, under `schema`; a stream that ends without
/// the leaf's end marker is an error (a short answer never passes for a whole one).
fn leaf_batches(
    addr: String,
    schema: SchemaRef,
    stream: tonic::Streaming<proto::QueryResponse>,
) -> impl futures::Stream<Item = Result<RecordBatch>> {
    futures::stream::unfold(
        (stream, addr, schema, false),
        |(mut stream, addr, schema, ended)| async move {
            if ended {
                return None;
            }
            let item = match stream.message().await {
                Ok(Some(m)) if m.end => return None,
                Ok(Some(m)) => common::arrow::decode_ipc(&m.arrow_ipc)
                    .map_err(|e| {
                        DataFusionError::Execution(format!("bad batch from leaf {addr}: {e}"))
                    })
                    .and_then(|batches| {
                        let mut parts = batches
                            .into_iter()
                            .map(|b| conform(&schema, b))
                            .collect::<Result<Vec<_>>>()?;
                        match parts.len() {
                            1 => Ok(parts.remove(0)),
                            _ => datafusion::arrow::compute::concat_batches(&schema, &parts)
                                .map_err(|e| DataFusionError::ArrowError(Box::new(e), None)),
                        }
                    }),
                Ok(None) => Err(DataFusionError::Execution(format!(
                    "scan on leaf {addr} failed: its answer ended early"
                ))),
                Err(s) => Err(leaf_error(&addr, &s)),
            };
            let failed = item.is_err();
            Some((item, (stream, addr, schema, failed)))
        },
    )
}

/// A leaf's batch under the plan's own schema (the same columns; field metadata and names as
/// the aggregator planned them).
fn conform(schema: &SchemaRef, b: RecordBatch) -> Result<RecordBatch> {
    let options = RecordBatchOptions::new().with_row_count(Some(b.num_rows()));
    RecordBatch::try_new_with_options(schema.clone(), b.columns().to_vec(), &options)
        .map_err(|e| DataFusionError::Execution(format!("a leaf sent rows of another shape: {e}")))
}

fn leaf_error(addr: &str, s: &tonic::Status) -> DataFusionError {
    DataFusionError::Execution(match s.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled => format!(
            "scan on leaf {addr} failed: the leaf is unreachable or not answering ({})",
            s.message()
        ),
        _ => format!("scan on leaf {addr} failed: {}", s.message()),
    })
}

/// Moves the operators that work within one partition from above a [`ClusterScanExec`] into
/// the fragment its leaves run. An operator moves only if its result, computed on each leaf's
/// rows alone, is what the operators above expect from that partition; one that cannot be
/// encoded for the leaves stays here.
#[derive(Debug, Default)]
pub struct PushToLeaves;

/// A context that plans as the aggregator does: DataFusion's defaults, Shardline's functions,
/// and [`PushToLeaves`]; `default_db` is the database unqualified names resolve in.
pub fn planning_context(default_db: &str) -> datafusion::prelude::SessionContext {
    let state = datafusion::execution::SessionStateBuilder::new()
        .with_config(query::session::config(default_db))
        .with_default_features()
        .with_physical_optimizer_rule(Arc::new(PushToLeaves))
        .build();
    query::session::with_functions(datafusion::prelude::SessionContext::new_with_state(state))
}

impl PushToLeaves {
    fn pushable(node: &Arc<dyn ExecutionPlan>, leaves: usize) -> bool {
        let single = leaves == 1;
        if node.downcast_ref::<FilterExec>().is_some()
            || node.downcast_ref::<ProjectionExec>().is_some()
            || node.downcast_ref::<LocalLimitExec>().is_some()
        {
            return true;
        }
        if let Some(a) = node.downcast_ref::<AggregateExec>() {
            return match a.mode() {
                AggregateMode::Partial => true,
                AggregateMode::Single | AggregateMode::SinglePartitioned => single,
                _ => false,
            };
        }
        if let Some(s) = node.downcast_ref::<SortExec>() {
            return s.preserve_partitioning() || single;
        }
        node.downcast_ref::<GlobalLimitExec>().is_some() && single
    }
}

impl PhysicalOptimizerRule for PushToLeaves {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let children = node.children();
            let [child] = children.as_slice() else {
                return Ok(Transformed::no(node));
            };
            let Some(scan) = child.downcast_ref::<ClusterScanExec>() else {
                return Ok(Transformed::no(node));
            };
            if !Self::pushable(&node, scan.leaves.len()) {
                return Ok(Transformed::no(node));
            }
            let fragment = Arc::clone(&node).replace_children(
                vec![scan.fragment.clone()],
                ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
            )?;
            if fragment.output_partitioning().partition_count() != 1
                || query::fragment::encode(fragment.clone()).is_err()
            {
                return Ok(Transformed::no(node));
            }
            let leaves = scan.leaves.clone();
            Ok(Transformed::yes(
                Arc::new(ClusterScanExec::new(fragment, leaves)) as Arc<dyn ExecutionPlan>,
            ))
        })
        .data()
    }

    fn name(&self) -> &str {
        "push_to_leaves"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::catalog::tables::{ColumnType, TableColumn};
    use datafusion::physical_plan::displayable;

    /// The physical plan of `sql` over a two-leaf table `t (topic, id, record JSON)`.
    async fn plan(sql: &str) -> String {
        let columns: Vec<TableColumn> = [
            ("topic", ColumnType::Text),
            ("id", ColumnType::Text),
            ("record", ColumnType::Json),
        ]
        .into_iter()
        .map(|(name, ty)| TableColumn {
            name: name.into(),
            ty,
            nullable: true,
            computed: None,
        })
        .collect();
        let table = ClusterTable {
            database: "d".into(),
            table: "t".into(),
            table_id: 1,
            schema: common::arrow::table_schema(&columns),
            columns: query::columns::to_proto(&columns),
            indexes: vec![],
            leaves: vec![
                ("127.0.0.1:1".into(), true, vec![0]),
                ("127.0.0.1:2".into(), true, vec![1]),
            ],
        };
        let ctx = planning_context("d");
        let schema = datafusion::catalog::MemorySchemaProvider::new();
        datafusion::catalog::SchemaProvider::register_table(&schema, "t".into(), Arc::new(table))
            .unwrap();
        let catalog = datafusion::catalog::MemoryCatalogProvider::new();
        datafusion::catalog::CatalogProvider::register_schema(&catalog, "d", Arc::new(schema))
            .unwrap();
        ctx.register_catalog("def", Arc::new(catalog));
        let df = ctx.sql(sql).await.unwrap();
        let plan = df.create_physical_plan().await.unwrap();
        let text = displayable(plan.as_ref()).indent(false).to_string();
        text
    }

    #[tokio::test]
    async fn filters_aggregates_and_limits_go_to_the_leaves() {
        let p = plan("SELECT COUNT(*) FROM t WHERE json_extract_bigint(record, 'seq') = 7").await;
        println!("{p}");
        assert!(p.contains("on each: AggregateExec: mode=Partial"), "{p}");
        assert!(p.contains("FilterExec"), "{p}");
        let p = plan("SELECT record FROM t WHERE json_extract_bigint(record, 'task') = 0 LIMIT 5")
            .await;
        println!("{p}");
        let leaf = p.lines().find(|l| l.contains("ClusterScanExec")).unwrap();
        assert!(
            leaf.contains("FilterExec") && leaf.contains("fetch=5"),
            "{p}"
        );
        let p = plan("SELECT json_extract_bigint(record, 'seq') s FROM t ORDER BY s DESC LIMIT 3")
            .await;
        println!("{p}");
        assert!(p.contains("on each: SortExec: TopK(fetch=3)"), "{p}");
        let p = plan("SELECT * FROM t LIMIT 10").await;
        println!("{p}");
        assert!(p.contains("limit=10"), "{p}");
    }
}
