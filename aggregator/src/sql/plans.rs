//! Plans kept from one SELECT to the next that differs only in its literals.
//!
//! Dashboards and point lookups send the same statement again and again with other values
//! (`... WHERE JSON_EXTRACT_BIGINT(record, 'seq') = 42`, then `= 43`). Parsing is cheap; turning
//! the statement into an optimized logical plan is not (on a small query it is about a third of
//! the aggregator's CPU). [`Shape::of`] replaces the literals a comparison, `IN` list or
//! `BETWEEN` compares against by placeholders (`$1`, `$2`, ...); [`PlanCache`] plans each shape
//! once and binds the values of every later statement of that shape into the kept plan, then
//! only physical planning is left per statement.
//!
//! A plan is kept only if binding values into it gives the plan the statement would have got
//! on its own: its tables are cluster tables (not `information_schema`, which is a snapshot of
//! the catalog), it reads no session variable and calls no function whose result can change
//! (`NOW()`, `RAND()`), and every placeholder has the type the literal would have had. A shape
//! that fails any of these is planned each time, and remembered as such. A cache lives in one
//! planning environment ([`super::env::QueryEnv`]), so a change to tables, columns, indexes or
//! leaves starts an empty one.

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::source_as_provider;
use datafusion::error::DataFusionError;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};
use datafusion::prelude::SQLOptions;
use datafusion::scalar::ScalarValue;
use datafusion::sql::sqlparser::ast::{
    visit_expressions_mut, BinaryOperator, Expr as SqlExpr, Query, Statement, Value,
};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use super::distributed::ClusterTable;
use super::env::StatementState;
use super::params;
use datafusion::physical_plan::ExecutionPlan;

/// How many shapes one environment keeps; when full it starts over (a workload with more
/// distinct statements than this is not one a plan cache helps).
const MAX_SHAPES: usize = 1024;

/// A statement with its compared literals taken out.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// The statement with `$n` in place of the literals.
    pub query: Query,
    /// The literals, `$1` first.
    pub values: Vec<ScalarValue>,
    /// The statement had placeholders before (an error to plan; never a shape to share).
    pub placeholders_of_its_own: bool,
}

impl Shape {
    /// Takes out integer and single-quoted string literals that a comparison (`=`, `<>`, `<`,
    /// `<=`, `>`, `>=`), an `IN` list or a `BETWEEN` compares an expression that is not a
    /// literal against. Other literals (function arguments such as JSON key paths, `LIMIT`,
    /// arithmetic) are part of the shape.
    pub fn of(query: &Query) -> Shape {
        let mut query = query.clone();
        let mut values = Vec::new();
        let mut placeholders_of_its_own = false;
        let mut take = |e: &mut SqlExpr| {
            let SqlExpr::Value(v) = e else { return };
            let value = match &v.value {
                Value::Number(n, false) => match n.parse::<i64>() {
                    Ok(i) => ScalarValue::Int64(Some(i)),
                    Err(_) => return,
                },
                Value::SingleQuotedString(s) => ScalarValue::Utf8(Some(s.clone())),
                _ => return,
            };
            values.push(value);
            let placeholder = Value::Placeholder(format!("${}", values.len()));
            *e = SqlExpr::Value(placeholder.with_empty_span());
        };
        let is_literal = |e: &SqlExpr| matches!(e, SqlExpr::Value(_));
        let _ = visit_expressions_mut(&mut query, |e| {
            match e {
                // `$1` is a placeholder in some dialects, a name in MySQL's: either would
                // print as one of the shape's own.
                SqlExpr::Value(v) if matches!(v.value, Value::Placeholder(_)) => {
                    placeholders_of_its_own = true;
                }
                SqlExpr::Identifier(i) if i.value.starts_with('$') => {
                    placeholders_of_its_own = true;
                }
                SqlExpr::CompoundIdentifier(parts)
                    if parts.iter().any(|i| i.value.starts_with('$')) =>
                {
                    placeholders_of_its_own = true;
                }
                SqlExpr::BinaryOp {
                    left,
                    op:
                        BinaryOperator::Eq
                        | BinaryOperator::NotEq
                        | BinaryOperator::Lt
                        | BinaryOperator::LtEq
                        | BinaryOperator::Gt
                        | BinaryOperator::GtEq,
                    right,
                } => {
                    if !is_literal(left) {
                        take(right);
                    } else if !is_literal(right) {
                        take(left);
                    }
                }
                SqlExpr::InList { expr, list, .. } if !is_literal(expr) => {
                    list.iter_mut().for_each(&mut take);
                }
                SqlExpr::Between {
                    expr, low, high, ..
                } if !is_literal(expr) => {
                    take(low);
                    take(high);
                }
                _ => {}
            }
            ControlFlow::<()>::Continue(())
        });
        Shape {
            query,
            values,
            placeholders_of_its_own,
        }
    }

    /// The cache key of this shape planned with `default_db` as the current database.
    fn key(&self, default_db: &str) -> String {
        let types: String = self
            .values
            .iter()
            .map(|v| match v {
                ScalarValue::Int64(_) => 'i',
                _ => 's',
            })
            .collect();
        format!("{default_db}\0{types}\0{}", self.query)
    }
}

/// What is kept for one shape.
#[derive(Debug)]
enum Kept {
    /// The optimized plan, with placeholders, and its physical plan if one can be kept
    /// ([`super::params`]).
    Plan {
        logical: LogicalPlan,
        physical: Option<Arc<dyn ExecutionPlan>>,
    },
    /// A shape whose plan depends on its values or its session: planned each time.
    PlannedEachTime,
}

/// A statement's plan as the cache gives it.
pub enum Planned {
    /// A copy of the shape's physical plan carrying the statement's values: ready to run;
    /// and whether the shape's plan was kept from an earlier statement (or made now).
    Physical(Arc<dyn ExecutionPlan>, bool),
    /// An optimized logical plan, and whether it was bound from a kept one.
    Logical(LogicalPlan, bool),
}

/// The plans of one planning environment, by shape.
#[derive(Debug, Default)]
pub struct PlanCache {
    shapes: Mutex<HashMap<String, Arc<Kept>>>,
}

impl PlanCache {
    /// The plan of `query` with `default_db` as the current database; `state` is made only
    /// if the statement is planned (not for a kept physical plan).
    pub async fn plan(
        &self,
        state: &mut StatementState<'_>,
        default_db: &str,
        query: &Query,
    ) -> Result<Planned, DataFusionError> {
        let shape = Shape::of(query);
        if shape.placeholders_of_its_own {
            return Ok(Planned::Logical(
                optimized(state.get(), query).await?,
                false,
            ));
        }
        let key = shape.key(default_db);
        let kept = self.lock().get(&key).cloned();
        match kept.as_deref() {
            Some(Kept::Plan {
                physical: Some(p), ..
            }) => {
                return Ok(Planned::Physical(
                    params::bind(p, &Arc::new(shape.values))?,
                    true,
                ))
            }
            Some(Kept::Plan { logical, .. }) => {
                return Ok(Planned::Logical(bind(logical, &shape.values)?, true))
            }
            Some(Kept::PlannedEachTime) => {
                return Ok(Planned::Logical(
                    optimized(state.get(), query).await?,
                    false,
                ))
            }
            None => {}
        }
        let state = state.get();
        let kept = match keepable(state, &shape).await {
            Some(logical) => {
                let physical = kept_physical(state, &logical).await;
                Kept::Plan { logical, physical }
            }
            None => Kept::PlannedEachTime,
        };
        // The first statement of a shape runs the physical plan just made for the shape.
        let planned = match &kept {
            Kept::Plan {
                physical: Some(p), ..
            } => Planned::Physical(params::bind(p, &Arc::new(shape.values))?, false),
            Kept::Plan { logical, .. } => Planned::Logical(bind(logical, &shape.values)?, false),
            Kept::PlannedEachTime => Planned::Logical(optimized(state, query).await?, false),
        };
        let mut shapes = self.lock();
        if shapes.len() >= MAX_SHAPES {
            shapes.clear();
        }
        shapes.insert(key, Arc::new(kept));
        Ok(planned)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Kept>>> {
        self.shapes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The physical plan of a kept shape's plan, if it can be kept too: its parameters all in
/// the leaves' fragments, and no scan of a table with an index (an index range is worked
/// out from the values while planning).
async fn kept_physical(
    state: &SessionState,
    logical: &LogicalPlan,
) -> Option<Arc<dyn ExecutionPlan>> {
    let mut indexed = false;
    let _ = logical.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            indexed |= source_as_provider(&scan.source).is_ok_and(|p| {
                p.downcast_ref::<ClusterTable>()
                    .is_some_and(|t| !t.indexes.is_empty())
            });
        }
        Ok(TreeNodeRecursion::Continue)
    });
    if indexed {
        return None;
    }
    let with_params = params::with_params(logical)?;
    let physical = state
        .query_planner()
        .create_physical_plan(&with_params, state)
        .await
        .ok()?;
    params::only_in_fragments(&physical).then_some(physical)
}

/// Plans a SELECT (only a SELECT: no DDL, DML or other statements), not yet optimized.
async fn planned(state: &SessionState, query: &Query) -> Result<LogicalPlan, DataFusionError> {
    let statement = datafusion::sql::parser::Statement::Statement(Box::new(Statement::Query(
        Box::new(query.clone()),
    )));
    let plan = state.statement_to_plan(statement).await?;
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(&plan)?;
    Ok(plan)
}

/// Plans and optimizes a SELECT.
async fn optimized(state: &SessionState, query: &Query) -> Result<LogicalPlan, DataFusionError> {
    state.optimize(&planned(state, query).await?)
}

/// The optimized plan of a shape, with placeholders, if it can be kept: the same for every
/// value and every session.
async fn keepable(state: &SessionState, shape: &Shape) -> Option<LogicalPlan> {
    let plan = planned(state, &shape.query).await.ok()?;
    // Checked before optimizing: the optimizer folds variables and NOW() into constants.
    if !constant(&plan) {
        return None;
    }
    let plan = state.optimize(&plan).ok()?;
    same_for_every_value(&plan, &shape.values).then_some(plan)
}

/// Whether a plan reads no session variable and calls no function whose result can change.
fn constant(plan: &LogicalPlan) -> bool {
    let mut constant = true;
    let walked = plan.apply_with_subqueries(|node| {
        node.apply_expressions(|e| {
            e.apply(|e| {
                constant &= match e {
                    Expr::ScalarVariable(..) => false,
                    Expr::ScalarFunction(f) => {
                        f.func.signature().volatility == Volatility::Immutable
                    }
                    _ => true,
                };
                Ok(if constant {
                    TreeNodeRecursion::Continue
                } else {
                    TreeNodeRecursion::Stop
                })
            })
        })
    });
    walked.is_ok() && constant
}

/// Whether binding any values of `values`' types into `plan` (optimized, with placeholders)
/// gives the plan those values would have got: it scans cluster tables only, at least one,
/// and every placeholder is there, typed as its value.
fn same_for_every_value(plan: &LogicalPlan, values: &[ScalarValue]) -> bool {
    let mut tables = 0;
    let mut cluster_only = true;
    let walked = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            tables += 1;
            cluster_only &= source_as_provider(&scan.source).is_ok_and(|p| p.is::<ClusterTable>());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    if walked.is_err() || tables == 0 || !cluster_only {
        return false;
    }
    let Ok(types) = plan.get_parameter_types() else {
        return false;
    };
    types.len() == values.len()
        && values.iter().enumerate().all(|(i, v)| {
            types
                .get(&format!("${}", i + 1))
                .is_some_and(|t| t.as_ref() == Some(&v.data_type()))
        })
}

fn bind(plan: &LogicalPlan, values: &[ScalarValue]) -> Result<LogicalPlan, DataFusionError> {
    if values.is_empty() {
        return Ok(plan.clone());
    }
    plan.clone().with_param_values(values.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::MySqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn query(sql: &str) -> Query {
        match Parser::parse_sql(&MySqlDialect {}, sql).unwrap().remove(0) {
            Statement::Query(q) => *q,
            other => panic!("not a query: {other}"),
        }
    }

    fn shape(sql: &str) -> (String, Vec<ScalarValue>) {
        let s = Shape::of(&query(sql));
        (s.query.to_string(), s.values)
    }

    #[test]
    fn compared_literals_become_placeholders() {
        let (text, values) = shape(
            "SELECT id FROM t WHERE JSON_EXTRACT_BIGINT(record, 'seq') = 42 AND topic <> 'x' LIMIT 5",
        );
        assert_eq!(
            text,
            "SELECT id FROM t WHERE JSON_EXTRACT_BIGINT(record, 'seq') = $1 AND topic <> $2 LIMIT 5"
        );
        assert_eq!(
            values,
            vec![
                ScalarValue::Int64(Some(42)),
                ScalarValue::Utf8(Some("x".into()))
            ]
        );
    }

    #[test]
    fn in_lists_between_and_literals_on_the_left() {
        let (text, values) =
            shape("SELECT 1 FROM t WHERE 7 < a AND b IN (1, 'two') AND c BETWEEN 3 AND 4");
        assert_eq!(
            text,
            "SELECT 1 FROM t WHERE $1 < a AND b IN ($2, $3) AND c BETWEEN $4 AND $5"
        );
        assert_eq!(values.len(), 5);
    }

    #[test]
    fn other_literals_stay_in_the_shape() {
        for sql in [
            "SELECT COUNT(*) FROM t",
            "SELECT 1 = 1 FROM t",
            "SELECT a FROM t WHERE a = 1.5",
            "SELECT a FROM t WHERE a = 99999999999999999999",
            "SELECT a FROM t WHERE a LIKE 'x%'",
            "SELECT a + 1 FROM t ORDER BY 1 LIMIT 3",
        ] {
            let (text, values) = shape(sql);
            assert!(values.is_empty(), "{sql} -> {text}");
            assert_eq!(text, query(sql).to_string());
        }
    }

    #[test]
    fn a_statement_with_placeholders_of_its_own_is_never_shared() {
        let s = Shape::of(&query("SELECT a FROM t WHERE a = $1 AND b = 5"));
        assert!(s.placeholders_of_its_own);
        assert!(!Shape::of(&query("SELECT a FROM t WHERE b = 5")).placeholders_of_its_own);
    }

    #[test]
    fn keys_tell_databases_and_value_types_apart() {
        let a = Shape::of(&query("SELECT a FROM t WHERE a = 1"));
        let b = Shape::of(&query("SELECT a FROM t WHERE a = 2"));
        let c = Shape::of(&query("SELECT a FROM t WHERE a = '1'"));
        assert_eq!(a.key("db"), b.key("db"));
        assert_ne!(a.key("db"), a.key("other"));
        assert_ne!(a.key("db"), c.key("db"));
    }
}
