//! JSON values the scan computes itself: a leaf rewrites the fragment it received so that each
//! `JSON_EXTRACT_<type>(column, 'key', ...)` the nodes right above a scan evaluate becomes a
//! column of the scan ([`Derived`]). A column segment that keeps that key path as a typed
//! sub-column answers it from the sub-column, without reading the JSON text; other rows get
//! the function's value computed once, by the same function. So a `GROUP BY
//! JSON_EXTRACT_BIGINT(record, 'task')` reads one integer column, and the JSON column is read
//! only where a query asks for its whole value.
//!
//! The rewrite keeps every node's output schema: only the scan and the nodes between it and
//! the first projection or aggregate above it change, so the rest of the plan (and what the
//! leaf sends back) is the same plan the aggregator made.

use crate::scan::LeafScanExec;
use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::{Field, FieldRef, Schema};
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::common::ScalarValue;
use datafusion::error::Result;
use datafusion::physical_expr::expressions::{Column, Literal};
use datafusion::physical_expr::{PhysicalExpr, ScalarFunctionExpr};
use datafusion::physical_plan::aggregates::{AggregateExec, PhysicalGroupBy};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
use datafusion::physical_plan::ExecutionPlan;
use std::sync::Arc;

/// The functions whose values a segment may keep as sub-columns.
pub const FUNCTIONS: [&str; 3] = [
    "json_extract_bigint",
    "json_extract_double",
    "json_extract_string",
];

/// One JSON value a scan computes per row, as a column after the table's columns.
#[derive(Debug, Clone)]
pub struct Derived {
    /// The table column the function reads (its index in the scan's table columns).
    pub column: usize,
    /// That column's name.
    pub source: String,
    /// One of [`FUNCTIONS`].
    pub function: String,
    /// The key path (never empty).
    pub path: Vec<String>,
    /// The call itself, over a batch that holds only the source column.
    pub expr: Arc<dyn PhysicalExpr>,
    /// Its column in the scan's output (a reserved name: MySQL identifiers hold no NUL).
    pub field: FieldRef,
}

impl Derived {
    /// The value for each row of `source` (the source column's values).
    pub fn evaluate(&self, source: &ArrayRef) -> Result<ArrayRef> {
        let schema = Schema::new(vec![Field::new(
            &self.source,
            source.data_type().clone(),
            true,
        )]);
        let batch = RecordBatch::try_new(Arc::new(schema), vec![source.clone()])?;
        self.expr.evaluate(&batch)?.into_array(batch.num_rows())
    }
}

/// A call a scan can compute: (the scan column it reads, function, key path).
type Call = (usize, String, Vec<String>);

fn call_of(e: &Arc<dyn PhysicalExpr>) -> Option<Call> {
    let f = e.downcast_ref::<ScalarFunctionExpr>()?;
    if !FUNCTIONS.contains(&f.name()) {
        return None;
    }
    let [col, keys @ ..] = f.args() else {
        return None;
    };
    let col = col.downcast_ref::<Column>()?;
    let path: Vec<String> = keys
        .iter()
        .map(|k| match k.downcast_ref::<Literal>()?.value() {
            ScalarValue::Utf8(Some(s)) => Some(s.clone()),
            _ => None,
        })
        .collect::<Option<_>>()?;
    (!path.is_empty()).then(|| (col.index(), f.name().to_string(), path))
}

/// `plan` with the JSON extractions right above its scans computed by the scans.
pub fn json_columns(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_down(|node| match rewrite(&node)? {
        Some(n) => Ok(Transformed::new(n, true, TreeNodeRecursion::Jump)),
        None => Ok(Transformed::no(node)),
    })
    .data()
}

/// How the rewrite maps each expression of a node it rebuilds.
type ExprMap<'a> = &'a dyn Fn(&Arc<dyn PhysicalExpr>) -> Result<Arc<dyn PhysicalExpr>>;

/// The consumer right above a scan: what it evaluates over the scan's rows.
enum Top<'a> {
    Projection(&'a ProjectionExec),
    Aggregate(&'a AggregateExec),
}

impl Top<'_> {
    fn exprs(&self) -> Vec<Arc<dyn PhysicalExpr>> {
        match self {
            Top::Projection(p) => p.projection_expr().iter().map(|e| e.expr.clone()).collect(),
            Top::Aggregate(a) => {
                let g = a.group_expr();
                let mut out: Vec<_> = g.expr().iter().map(|(e, _)| e.clone()).collect();
                out.extend(g.null_expr().iter().map(|(e, _)| e.clone()));
                for f in a.aggr_expr() {
                    out.extend(f.expressions());
                    out.extend(f.order_bys().iter().map(|s| s.expr.clone()));
                }
                out.extend(a.filter_expr().iter().flatten().cloned());
                out
            }
        }
    }

    /// The same node over `input`, its expressions mapped by `map`.
    fn rebuild(
        &self,
        input: Arc<dyn ExecutionPlan>,
        map: ExprMap<'_>,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        Ok(Some(match self {
            Top::Projection(p) => {
                let exprs = p
                    .projection_expr()
                    .iter()
                    .map(|e| {
                        Ok(ProjectionExpr {
                            expr: map(&e.expr)?,
                            alias: e.alias.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Arc::new(ProjectionExec::try_new(exprs, input)?)
            }
            Top::Aggregate(a) => {
                let g = a.group_expr();
                let pairs = |v: &[(Arc<dyn PhysicalExpr>, String)]| {
                    v.iter()
                        .map(|(e, n)| Ok((map(e)?, n.clone())))
                        .collect::<Result<Vec<_>>>()
                };
                let group = PhysicalGroupBy::new(
                    pairs(g.expr())?,
                    pairs(g.null_expr())?,
                    g.groups().to_vec(),
                    g.has_grouping_set(),
                );
                let mut aggregates = vec![];
                for f in a.aggr_expr() {
                    let args = f.expressions().iter().map(map).collect::<Result<_>>()?;
                    let order = f
                        .order_bys()
                        .iter()
                        .map(|s| map(&s.expr))
                        .collect::<Result<_>>()?;
                    match f.with_new_expressions(args, order) {
                        Some(f) => aggregates.push(Arc::new(f)),
                        None => return Ok(None),
                    }
                }
                let filters = a
                    .filter_expr()
                    .iter()
                    .map(|f| f.as_ref().map(map).transpose())
                    .collect::<Result<_>>()?;
                let schema = input.schema();
                Arc::new(
                    AggregateExec::try_new(*a.mode(), group, aggregates, filters, input, schema)?
                        .with_limit_options(a.limit_options()),
                )
            }
        }))
    }
}

/// `node` rewritten if it is a projection or aggregate over (filters over) a scan that
/// evaluates JSON extractions the scan can compute.
fn rewrite(node: &Arc<dyn ExecutionPlan>) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let top = if let Some(p) = node.downcast_ref::<ProjectionExec>() {
        Top::Projection(p)
    } else if let Some(a) = node.downcast_ref::<AggregateExec>() {
        Top::Aggregate(a)
    } else {
        return Ok(None);
    };
    // The nodes between the consumer and the scan: filters only (DataFusion folds a projection
    // into a filter: its output is some of its input's columns).
    let mut chain: Vec<Arc<dyn ExecutionPlan>> = vec![];
    let mut below = node.children()[0].clone();
    let scan = loop {
        if let Some(s) = below.downcast_ref::<LeafScanExec>() {
            break s;
        }
        let next = match below.downcast_ref::<FilterExec>() {
            Some(f) => f.input().clone(),
            None => return Ok(None),
        };
        chain.push(below);
        below = next;
    };
    if !scan.derived().is_empty() {
        return Ok(None);
    }
    let filters: Vec<&FilterExec> = chain
        .iter()
        .filter_map(|n| n.downcast_ref::<FilterExec>())
        .collect();
    let scan_schema = scan.schema();
    // Every expression over the scan's columns: the consumer's over the topmost filter's
    // output, a filter's predicate over the output of the filter below it.
    let in_scan = |e: &Arc<dyn PhysicalExpr>, from: usize| -> Result<Arc<dyn PhysicalExpr>> {
        Arc::clone(e)
            .transform_down(|n| {
                let Some(c) = n.downcast_ref::<Column>() else {
                    return Ok(Transformed::no(n));
                };
                let mut i = c.index();
                for f in &filters[from..] {
                    if let Some(p) = f.projection() {
                        i = p[i];
                    }
                }
                let name = scan_schema.field(i).name();
                Ok(Transformed::yes(Arc::new(Column::new(name, i)) as _))
            })
            .data()
    };
    let mut exprs: Vec<_> = top
        .exprs()
        .iter()
        .map(|e| in_scan(e, 0))
        .collect::<Result<_>>()?;
    for (k, f) in filters.iter().enumerate() {
        exprs.push(in_scan(f.predicate(), k + 1)?);
    }

    // Each distinct call, with the expression it was found as.
    let mut calls: Vec<Call> = vec![];
    let mut found: Vec<Arc<dyn PhysicalExpr>> = vec![];
    for e in &exprs {
        e.apply(|n| {
            Ok(match call_of(n) {
                Some(c) => {
                    if !calls.contains(&c) {
                        calls.push(c);
                        found.push(n.clone());
                    }
                    TreeNodeRecursion::Jump
                }
                None => TreeNodeRecursion::Continue,
            })
        })?;
    }
    if calls.is_empty() {
        return Ok(None);
    }

    let positions = scan.positions();
    let width = positions.len();
    let derived: Vec<Derived> = calls
        .iter()
        .zip(&found)
        .map(|((col, function, path), call)| {
            derived(&scan_schema, &positions, *col, function, path, call)
        })
        .collect::<Result<_>>()?;

    // Calls become columns after the scan's own; then the scan keeps only the table columns
    // still read.
    let replace = |e: &Arc<dyn PhysicalExpr>| -> Result<Arc<dyn PhysicalExpr>> {
        Arc::clone(e)
            .transform_down(|n| {
                Ok(
                    match call_of(&n).and_then(|c| calls.iter().position(|x| *x == c)) {
                        Some(k) => Transformed::new(
                            Arc::new(Column::new(derived[k].field.name(), width + k)) as _,
                            true,
                            TreeNodeRecursion::Jump,
                        ),
                        None => Transformed::no(n),
                    },
                )
            })
            .data()
    };
    let mut used = vec![false; width];
    for e in &exprs {
        for c in datafusion::physical_expr::utils::collect_columns(&replace(e)?) {
            if c.index() < width {
                used[c.index()] = true;
            }
        }
    }
    let kept: Vec<usize> = (0..width).filter(|i| used[*i]).collect();
    let new_index = |i: usize| {
        if i < width {
            kept.iter().position(|k| *k == i).unwrap_or(i)
        } else {
            kept.len() + (i - width)
        }
    };
    let map = |e: &Arc<dyn PhysicalExpr>| -> Result<Arc<dyn PhysicalExpr>> {
        replace(e)?
            .transform_down(|n| {
                Ok(match n.downcast_ref::<Column>() {
                    Some(c) => {
                        Transformed::yes(Arc::new(Column::new(c.name(), new_index(c.index()))) as _)
                    }
                    None => Transformed::no(n),
                })
            })
            .data()
    };

    let mut table_scan = scan.table_scan().clone();
    table_scan.projection = Some(proto::Projection {
        columns: kept.iter().map(|i| positions[*i] as u32).collect(),
    });
    let mut new_scan = LeafScanExec::with_derived(table_scan, derived.clone())?;
    if let Some(source) = scan.source() {
        new_scan = new_scan.bound(source);
    }
    // The filters keep no projection: each passes the new scan's columns through, and the
    // consumer's expressions read them there.
    let mut input: Arc<dyn ExecutionPlan> = Arc::new(new_scan);
    let top_count = exprs.len() - filters.len();
    for (k, old) in chain.iter().enumerate().rev() {
        let predicate = map(&exprs[top_count + k])?;
        let rebuilt: Arc<dyn ExecutionPlan> = Arc::new(FilterExec::try_new(predicate, input)?);
        input = match old.fetch() {
            Some(n) => match rebuilt.with_fetch(Some(n)) {
                Some(r) => r,
                None => return Ok(None),
            },
            None => rebuilt,
        };
    }
    let in_new = |e: &Arc<dyn PhysicalExpr>| map(&in_scan(e, 0)?);
    let Some(mut new) = top.rebuild(input, &in_new)? else {
        return Ok(None);
    };
    if let Some(n) = node.fetch() {
        match new.with_fetch(Some(n)) {
            Some(r) => new = r,
            None => return Ok(None),
        }
    }
    // What the nodes above read must not change.
    let same = |a: &Schema, b: &Schema| {
        a.fields().len() == b.fields().len()
            && a.fields()
                .iter()
                .zip(b.fields())
                .all(|(x, y)| x.name() == y.name() && x.data_type() == y.data_type())
    };
    Ok(same(&new.schema(), &node.schema()).then_some(new))
}

/// The [`Derived`] value for `call` (over the scan's columns).
fn derived(
    scan_schema: &Schema,
    positions: &[usize],
    col: usize,
    function: &str,
    path: &[String],
    call: &Arc<dyn PhysicalExpr>,
) -> Result<Derived> {
    let source = scan_schema.field(col).name().clone();
    // The call with its column rebound to index 0 (a batch of the source column only).
    let expr = Arc::clone(call)
        .transform_down(|n| {
            Ok(match n.downcast_ref::<Column>() {
                Some(c) => Transformed::yes(Arc::new(Column::new(c.name(), 0)) as _),
                None => Transformed::no(n),
            })
        })
        .data()?;
    let data_type = expr.data_type(&Schema::new(vec![scan_schema.field(col).clone()]))?;
    let name = format!("\0derived\0{function}\0{source}\0{path:?}");
    Ok(Derived {
        column: positions[col],
        source,
        function: function.to_string(),
        path: path.to_vec(),
        expr,
        field: Arc::new(Field::new(name, data_type, true)),
    })
}
