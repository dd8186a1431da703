//! Constant expressions: literals, arithmetic, `@@variables`, `@user_vars` and the session
//! functions clients call on connect (`DATABASE()`, `USER()`, `VERSION()`, `CONNECTION_ID()`).

use super::parse::Scope;
use super::result::{codes, SqlError, Value};
use sqlparser::ast::{BinaryOperator, Expr, FunctionArguments, UnaryOperator, Value as AstValue};

/// What an expression may read from its session.
pub trait EvalContext {
    /// A system variable; `scope` is `None` for plain `@@name`.
    fn system_variable(&self, scope: Option<Scope>, name: &str) -> Result<Value, SqlError>;
    fn user_variable(&self, name: &str) -> Value;
    fn database(&self) -> Option<String>;
    fn user(&self) -> String;
    fn connection_id(&self) -> u32;
}

/// Evaluates a constant expression.
pub fn eval(expr: &Expr, ctx: &dyn EvalContext) -> Result<Value, SqlError> {
    match expr {
        Expr::Value(v) => literal(&v.value),
        Expr::Nested(e) => eval(e, ctx),
        Expr::Identifier(ident) => variable(&ident.value, None, ctx).unwrap_or_else(|| {
            Err(SqlError::new(
                1054,
                format!("Unknown column '{}' in 'field list'", ident.value),
            ))
        }),
        Expr::CompoundIdentifier(parts) if parts.len() == 2 => {
            let scope = match parts[0].value.to_ascii_lowercase().as_str() {
                "@@global" => Some(Scope::Global),
                "@@session" | "@@local" => Some(Scope::Session),
                _ => None,
            };
            match scope {
                Some(scope) => ctx.system_variable(Some(scope), &parts[1].value),
                None => Err(SqlError::unsupported(format!("column reference {expr}"))),
            }
        }
        Expr::UnaryOp { op, expr } => {
            let v = eval(expr, ctx)?;
            match (op, v) {
                (UnaryOperator::Plus, v) => Ok(v),
                (UnaryOperator::Minus, Value::Int(i)) => Ok(Value::Int(-i)),
                (UnaryOperator::Minus, Value::Double(d)) => Ok(Value::Double(-d)),
                (UnaryOperator::Minus, Value::Null) => Ok(Value::Null),
                (UnaryOperator::Not, v) => Ok(match truthy(&v) {
                    None => Value::Null,
                    Some(b) => Value::Int(i64::from(!b)),
                }),
                (op, _) => Err(SqlError::unsupported(format!("operator {op}"))),
            }
        }
        Expr::BinaryOp { left, op, right } => arithmetic(op, eval(left, ctx)?, eval(right, ctx)?),
        Expr::Function(f) => {
            let name = f.name.to_string().to_ascii_uppercase();
            let no_args = match &f.args {
                FunctionArguments::None => true,
                FunctionArguments::List(l) => l.args.is_empty(),
                FunctionArguments::Subquery(_) => false,
            };
            if !no_args {
                return Err(SqlError::unsupported(format!(
                    "function {name} with arguments"
                )));
            }
            match name.as_str() {
                "DATABASE" | "SCHEMA" => Ok(ctx.database().map_or(Value::Null, Value::Text)),
                "USER" | "CURRENT_USER" | "SESSION_USER" | "SYSTEM_USER" => {
                    Ok(Value::Text(ctx.user()))
                }
                "VERSION" => Ok(Value::Text(common::variables::SERVER_VERSION.into())),
                "CONNECTION_ID" => Ok(Value::Int(i64::from(ctx.connection_id()))),
                _ => Err(SqlError::new(
                    1305,
                    format!("FUNCTION {name} does not exist"),
                )),
            }
        }
        other => Err(SqlError::unsupported(format!("expression {other}"))),
    }
}

/// `@@x`, `@x`, or `None` for a plain identifier.
fn variable(
    name: &str,
    scope: Option<Scope>,
    ctx: &dyn EvalContext,
) -> Option<Result<Value, SqlError>> {
    if let Some(sys) = name.strip_prefix("@@") {
        return Some(ctx.system_variable(scope, sys));
    }
    name.strip_prefix('@')
        .map(|user| Ok(ctx.user_variable(user)))
}

fn literal(v: &AstValue) -> Result<Value, SqlError> {
    match v {
        AstValue::Number(n, _) => Ok(n
            .parse::<i64>()
            .map(Value::Int)
            .or_else(|_| n.parse::<f64>().map(Value::Double))
            .map_err(|_| SqlError::parse(format!("bad number {n}")))?),
        AstValue::SingleQuotedString(s) | AstValue::DoubleQuotedString(s) => {
            Ok(Value::Text(s.clone()))
        }
        AstValue::Boolean(b) => Ok(Value::Int(i64::from(*b))),
        AstValue::Null => Ok(Value::Null),
        other => Err(SqlError::unsupported(format!("literal {other}"))),
    }
}

fn truthy(v: &Value) -> Option<bool> {
    match v {
        Value::Null => None,
        Value::Int(i) => Some(*i != 0),
        Value::Double(d) => Some(*d != 0.0),
        Value::Text(s) => Some(s.trim().parse::<f64>().is_ok_and(|d| d != 0.0)),
        Value::Bytes(_) => Some(false),
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Null => None,
        Value::Int(i) => Some(*i as f64),
        Value::Double(d) => Some(*d),
        Value::Text(s) => Some(s.trim().parse().unwrap_or(0.0)),
        Value::Bytes(_) => Some(0.0),
    }
}

fn arithmetic(op: &BinaryOperator, l: Value, r: Value) -> Result<Value, SqlError> {
    if l == Value::Null || r == Value::Null {
        return Ok(Value::Null);
    }
    if let (Value::Int(a), Value::Int(b)) = (&l, &r) {
        let out = match op {
            BinaryOperator::Plus => a.checked_add(*b),
            BinaryOperator::Minus => a.checked_sub(*b),
            BinaryOperator::Multiply => a.checked_mul(*b),
            _ => None,
        };
        if let Some(v) = out {
            return Ok(Value::Int(v));
        }
        if !matches!(op, BinaryOperator::Divide)
            && matches!(
                op,
                BinaryOperator::Plus | BinaryOperator::Minus | BinaryOperator::Multiply
            )
        {
            return Err(SqlError::new(
                1690,
                format!("BIGINT value is out of range in '{a} {op} {b}'"),
            ));
        }
    }
    let (Some(a), Some(b)) = (as_f64(&l), as_f64(&r)) else {
        return Ok(Value::Null);
    };
    match op {
        BinaryOperator::Plus => Ok(Value::Double(a + b)),
        BinaryOperator::Minus => Ok(Value::Double(a - b)),
        BinaryOperator::Multiply => Ok(Value::Double(a * b)),
        BinaryOperator::Divide if b == 0.0 => Ok(Value::Null),
        BinaryOperator::Divide => Ok(Value::Double(a / b)),
        other => Err(SqlError::new(
            codes::NOT_SUPPORTED_YET,
            format!("This version of Shardline doesn't yet support operator '{other}' here"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::dialect::MySqlDialect;
    use sqlparser::parser::Parser;

    struct Ctx;
    impl EvalContext for Ctx {
        fn system_variable(&self, scope: Option<Scope>, name: &str) -> Result<Value, SqlError> {
            Ok(Value::Text(format!("{scope:?}:{name}")))
        }
        fn user_variable(&self, _: &str) -> Value {
            Value::Null
        }
        fn database(&self) -> Option<String> {
            Some("d".into())
        }
        fn user(&self) -> String {
            "root@%".into()
        }
        fn connection_id(&self) -> u32 {
            7
        }
    }

    fn ev(sql: &str) -> Result<Value, SqlError> {
        let e = Parser::new(&MySqlDialect {})
            .try_with_sql(sql)
            .unwrap()
            .parse_expr()
            .unwrap();
        eval(&e, &Ctx)
    }

    #[test]
    fn constants() {
        assert_eq!(ev("1").unwrap(), Value::Int(1));
        assert_eq!(ev("1 + 2 * 3").unwrap(), Value::Int(7));
        assert_eq!(ev("-(4)").unwrap(), Value::Int(-4));
        assert_eq!(ev("1 / 0").unwrap(), Value::Null);
        assert_eq!(ev("7 / 2").unwrap(), Value::Double(3.5));
        assert_eq!(ev("'a'").unwrap(), Value::Text("a".into()));
        assert_eq!(ev("NULL + 1").unwrap(), Value::Null);
        assert!(ev("9223372036854775807 + 1").is_err());
    }

    #[test]
    fn session_lookups() {
        assert_eq!(
            ev("@@version_comment").unwrap(),
            Value::Text("None:version_comment".into())
        );
        assert_eq!(
            ev("@@global.x").unwrap(),
            Value::Text("Some(Global):x".into())
        );
        assert_eq!(
            ev("@@session.x").unwrap(),
            Value::Text("Some(Session):x".into())
        );
        assert_eq!(ev("DATABASE()").unwrap(), Value::Text("d".into()));
        assert_eq!(ev("connection_id()").unwrap(), Value::Int(7));
        assert_eq!(ev("nope()").unwrap_err().code, 1305);
        assert_eq!(ev("some_column").unwrap_err().code, 1054);
    }
}
