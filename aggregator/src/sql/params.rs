//! Physical plans kept per statement shape, with the statement's values bound only where they
//! leave the aggregator: in the plan fragments sent to the leaves.
//!
//! A shape's optimized logical plan has placeholders (`$1`, ...; [`super::plans`]). Physical
//! planning cannot take a placeholder, so [`with_params`] turns each into a call of
//! [`PARAM`] (`shardline_param(1, <typed NULL>)`, of the placeholder's type) and the shape is
//! planned once more, physically. That plan is kept if every parameter ended up in a
//! fragment ([`only_in_fragments`]): a statement of the shape then skips physical planning,
//! its values travel in the [`super::distributed::ClusterScanExec`] nodes of a fresh copy of
//! the plan ([`bind`]), and each fragment is encoded with [`Bind`], which writes a parameter
//! as the literal it stands for. The leaves see the plan the statement would have had, with
//! literals; no `shardline_param` call is ever evaluated (one that were would fail, never
//! give a wrong answer).

use super::distributed::ClusterScanExec;
use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::expr::{Placeholder, ScalarFunction};
use datafusion::logical_expr::{
    ColumnarValue, Expr, LogicalPlan, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};
use datafusion::physical_expr::ScalarFunctionExpr;
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr};
use datafusion::scalar::ScalarValue;
use datafusion_proto::physical_plan::{
    PhysicalExtensionCodec, PhysicalPlanDecodeContext, PhysicalPlanNodeExt,
    PhysicalProtoConverterExtension,
};
use datafusion_proto::protobuf;
use std::sync::{Arc, OnceLock};

/// The name of the function a parameter becomes in a kept physical plan.
pub const PARAM: &str = "shardline_param";

/// `shardline_param(n, <NULL of the type>)`: parameter `$n`, of the second argument's type.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Param {
    signature: Signature,
}

impl ScalarUDFImpl for Param {
    fn name(&self) -> &str {
        PARAM
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        args.get(1)
            .cloned()
            .ok_or_else(|| DataFusionError::Internal(format!("{PARAM} needs two arguments")))
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        Err(DataFusionError::Internal(format!(
            "a statement parameter was not bound ({PARAM} evaluated)"
        )))
    }
}

fn param_udf() -> Arc<ScalarUDF> {
    static UDF: OnceLock<Arc<ScalarUDF>> = OnceLock::new();
    UDF.get_or_init(|| {
        Arc::new(ScalarUDF::new_from_impl(Param {
            signature: Signature::any(2, Volatility::Immutable),
        }))
    })
    .clone()
}

/// `plan` (optimized, with typed placeholders) with each placeholder a [`PARAM`] call; `None`
/// if a placeholder has no type or no such number.
pub fn with_params(plan: &LogicalPlan) -> Option<LogicalPlan> {
    let mut untyped = false;
    let out = plan
        .clone()
        .transform_up_with_subqueries(|node| {
            node.map_expressions(|e| {
                e.transform_up(|e| {
                    let Expr::Placeholder(Placeholder { id, field }) = &e else {
                        return Ok(Transformed::no(e));
                    };
                    let n = id.strip_prefix('$').and_then(|n| n.parse::<i64>().ok());
                    let typed = field
                        .as_ref()
                        .and_then(|f| ScalarValue::try_from(f.data_type()).ok());
                    let (Some(n), Some(null)) = (n, typed) else {
                        untyped = true;
                        return Ok(Transformed::no(e));
                    };
                    Ok(Transformed::yes(Expr::ScalarFunction(
                        ScalarFunction::new_udf(
                            param_udf(),
                            vec![
                                Expr::Literal(ScalarValue::Int64(Some(n)), None),
                                Expr::Literal(null, None),
                            ],
                        ),
                    )))
                })
            })
        })
        .data()
        .ok()?;
    (!untyped).then_some(out)
}

/// The parameter number of a [`PARAM`] call.
fn param_of(e: &Arc<dyn PhysicalExpr>) -> Option<usize> {
    use datafusion::physical_expr::expressions::Literal;
    let f = e.downcast_ref::<ScalarFunctionExpr>()?;
    if f.name() != PARAM {
        return None;
    }
    match f.args().first()?.downcast_ref::<Literal>()?.value() {
        ScalarValue::Int64(Some(n)) if *n >= 1 => Some(*n as usize),
        _ => None,
    }
}

/// Whether a physical plan uses parameters in fragments only: none in an operator that runs
/// on the aggregator (it could not evaluate one). The fragments are inside
/// [`ClusterScanExec`], whose expressions and children this walk does not see.
pub fn only_in_fragments(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut found = false;
    let _ = plan.apply(|node| {
        node.apply_expressions(&mut |e| {
            e.apply(|e| {
                found |= e
                    .downcast_ref::<ScalarFunctionExpr>()
                    .is_some_and(|f| f.name() == PARAM);
                Ok(if found {
                    TreeNodeRecursion::Stop
                } else {
                    TreeNodeRecursion::Continue
                })
            })
        })?;
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    !found
}

/// A fresh copy of a kept physical plan for one statement: every operator's run state reset
/// (the kept plan runs for many statements at once), its cluster scans carrying `values`.
pub fn bind(
    plan: &Arc<dyn ExecutionPlan>,
    values: &Arc<Vec<ScalarValue>>,
) -> Result<Arc<dyn ExecutionPlan>> {
    Arc::clone(plan)
        .transform_up(|node| {
            if let Some(scan) = node.downcast_ref::<ClusterScanExec>() {
                return Ok(Transformed::yes(
                    Arc::new(scan.with_values(values.clone())) as _
                ));
            }
            Ok(Transformed::yes(node.reset_state()?))
        })
        .data()
}

/// Encodes a fragment with its parameters written as the literals they stand for.
#[derive(Debug)]
pub struct Bind<'a> {
    pub values: &'a [ScalarValue],
}

impl PhysicalProtoConverterExtension for Bind<'_> {
    fn proto_to_execution_plan(
        &self,
        proto: &protobuf::PhysicalPlanNode,
        ctx: &PhysicalPlanDecodeContext<'_>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.default_proto_to_execution_plan(proto, ctx)
    }

    fn execution_plan_to_proto(
        &self,
        plan: &Arc<dyn ExecutionPlan>,
        codec: &dyn PhysicalExtensionCodec,
    ) -> Result<protobuf::PhysicalPlanNode> {
        protobuf::PhysicalPlanNode::try_from_physical_plan_with_converter(
            Arc::clone(plan),
            codec,
            self,
        )
    }

    fn proto_to_physical_expr(
        &self,
        proto: &protobuf::PhysicalExprNode,
        input_schema: &Schema,
        ctx: &PhysicalPlanDecodeContext<'_>,
    ) -> Result<Arc<dyn PhysicalExpr>> {
        self.default_proto_to_physical_expr(proto, input_schema, ctx)
    }

    fn physical_expr_to_proto(
        &self,
        expr: &Arc<dyn PhysicalExpr>,
        codec: &dyn PhysicalExtensionCodec,
    ) -> Result<protobuf::PhysicalExprNode> {
        let bound: Arc<dyn PhysicalExpr> = match param_of(expr) {
            Some(n) => {
                let value = self.values.get(n - 1).cloned().ok_or_else(|| {
                    DataFusionError::Internal(format!("no value for parameter ${n}"))
                })?;
                datafusion::physical_expr::expressions::lit(value)
            }
            None => Arc::clone(expr),
        };
        datafusion_proto::physical_plan::to_proto::serialize_physical_expr_with_converter(
            &bound, codec, self,
        )
    }
}
