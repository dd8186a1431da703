//! Expressions of persisted computed columns, evaluated where rows are written (leaves):
//! column references, literals, and SingleStore's `JSON_EXTRACT_<type>`, `FROM_BASE64`,
//! `TO_BASE64`, with the same semantics as the query engine's functions (`json`).

use crate::catalog::tables::{ColumnType, TableColumn};
use crate::json::{extract, from_base64, Extracted, JsonKind};
use base64::Engine as _;
use serde_json::Value as Json;
use sqlparser::ast::{
    Expr as Ast, FunctionArg, FunctionArgExpr, FunctionArguments, Value as AstValue,
};
use sqlparser::dialect::MySqlDialect;
use sqlparser::parser::Parser;

/// A compiled expression over a row's columns.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Column(usize),
    Text(String),
    Int(i64),
    Null,
    Json(JsonKind, Vec<Expr>),
    FromBase64(Box<Expr>),
    ToBase64(Box<Expr>),
}

/// A value while evaluating.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Text(String),
    Bytes(Vec<u8>),
    Int(i64),
    Double(f64),
}

impl Val {
    fn text(&self) -> Option<String> {
        match self {
            Val::Null => None,
            Val::Text(s) => Some(s.clone()),
            Val::Bytes(b) => String::from_utf8(b.clone()).ok(),
            Val::Int(i) => Some(i.to_string()),
            Val::Double(d) => Some(d.to_string()),
        }
    }
}

/// Parses and compiles `sql` against the columns that may be referenced.
pub fn compile(sql: &str, columns: &[TableColumn]) -> Result<Expr, String> {
    let ast = Parser::new(&MySqlDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| format!("cannot parse expression '{sql}': {e}"))?;
    convert(&ast, columns)
}

fn convert(ast: &Ast, columns: &[TableColumn]) -> Result<Expr, String> {
    match ast {
        Ast::Nested(e) => convert(e, columns),
        Ast::Identifier(id) => columns
            .iter()
            .position(|c| c.name.eq_ignore_ascii_case(&id.value))
            .map(Expr::Column)
            .ok_or_else(|| {
                format!(
                    "Unknown column '{}' in computed column expression",
                    id.value
                )
            }),
        Ast::Value(v) => match &v.value {
            AstValue::SingleQuotedString(s) | AstValue::DoubleQuotedString(s) => {
                Ok(Expr::Text(s.clone()))
            }
            AstValue::Number(n, _) => n
                .parse()
                .map(Expr::Int)
                .map_err(|_| format!("unsupported number {n}")),
            AstValue::Null => Ok(Expr::Null),
            other => Err(format!("unsupported literal {other}")),
        },
        Ast::Function(f) => {
            let name = f.name.to_string().to_ascii_uppercase();
            let FunctionArguments::List(list) = &f.args else {
                return Err(format!("{name} needs arguments"));
            };
            let args = list
                .args
                .iter()
                .map(|a| match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => convert(e, columns),
                    other => Err(format!("unsupported argument {other}")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let one = |args: Vec<Expr>| -> Result<Box<Expr>, String> {
                let [a]: [Expr; 1] = args
                    .try_into()
                    .map_err(|_| format!("{name} takes one argument"))?;
                Ok(Box::new(a))
            };
            let kind = match name.as_str() {
                "JSON_EXTRACT_STRING" => JsonKind::String,
                "JSON_EXTRACT_BIGINT" => JsonKind::BigInt,
                "JSON_EXTRACT_DOUBLE" => JsonKind::Double,
                "JSON_EXTRACT_JSON" => JsonKind::Json,
                "FROM_BASE64" => return Ok(Expr::FromBase64(one(args)?)),
                "TO_BASE64" => return Ok(Expr::ToBase64(one(args)?)),
                _ => {
                    return Err(format!(
                        "function {name} is not supported in computed columns"
                    ))
                }
            };
            if args.len() < 2 {
                return Err(format!(
                    "{name} needs a JSON value and at least one key or index"
                ));
            }
            Ok(Expr::Json(kind, args))
        }
        other => Err(format!(
            "unsupported expression {other} in a computed column"
        )),
    }
}

/// Evaluates against a row (JSON array values in column order).
pub fn eval(e: &Expr, row: &[Json]) -> Val {
    match e {
        Expr::Column(i) => match row.get(*i) {
            Some(Json::String(s)) => Val::Text(s.clone()),
            Some(Json::Number(n)) => n
                .as_i64()
                .map(Val::Int)
                .unwrap_or_else(|| Val::Double(n.as_f64().unwrap_or(0.0))),
            Some(Json::Bool(b)) => Val::Int(i64::from(*b)),
            Some(Json::Null) | None => Val::Null,
            Some(other) => Val::Text(other.to_string()),
        },
        Expr::Text(s) => Val::Text(s.clone()),
        Expr::Int(i) => Val::Int(*i),
        Expr::Null => Val::Null,
        Expr::FromBase64(a) => match eval(a, row).text() {
            Some(s) => from_base64(&s).map_or(Val::Null, Val::Bytes),
            None => Val::Null,
        },
        Expr::ToBase64(a) => match eval(a, row) {
            Val::Null => Val::Null,
            Val::Bytes(b) => Val::Text(base64::engine::general_purpose::STANDARD.encode(b)),
            v => v.text().map_or(Val::Null, |s| {
                Val::Text(base64::engine::general_purpose::STANDARD.encode(s))
            }),
        },
        Expr::Json(kind, args) => {
            let Some(json) = eval(&args[0], row).text() else {
                return Val::Null;
            };
            let path: Option<Vec<String>> = args[1..].iter().map(|a| eval(a, row).text()).collect();
            let Some(path) = path else {
                return Val::Null;
            };
            let refs: Vec<&str> = path.iter().map(String::as_str).collect();
            match extract(&json, &refs, *kind) {
                None => Val::Null,
                Some(Extracted::Text(s)) => Val::Text(s),
                Some(Extracted::Int(i)) => Val::Int(i),
                Some(Extracted::Double(d)) => Val::Double(d),
            }
        }
    }
}

/// A value stored in a column of type `ty` (JSON array cell).
pub fn store(v: Val, ty: &ColumnType) -> Json {
    match (v, ty) {
        (Val::Null, _) => Json::Null,
        (Val::Int(i), ColumnType::BigInt | ColumnType::Int) => Json::from(i),
        (Val::Double(d), ColumnType::BigInt | ColumnType::Int) => Json::from(d.round() as i64),
        (Val::Text(s), ColumnType::BigInt | ColumnType::Int) => {
            Json::from(s.trim().parse::<i64>().unwrap_or(0))
        }
        (Val::Bytes(_), ColumnType::BigInt | ColumnType::Int) => Json::from(0),
        (Val::Int(i), ColumnType::Double) => Json::from(i as f64),
        (Val::Double(d), ColumnType::Double) => {
            serde_json::Number::from_f64(d).map_or(Json::Null, Json::Number)
        }
        (v, ColumnType::Double) => Json::from(
            v.text()
                .and_then(|s| s.trim().parse::<f64>().ok())
                .unwrap_or(0.0),
        ),
        (Val::Bytes(b), ColumnType::Blob) => {
            Json::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
        (v, ColumnType::Varchar(n)) => v.text().map_or(Json::Null, |s| {
            Json::String(s.chars().take(*n as usize).collect())
        }),
        (v, _) => v.text().map_or(Json::Null, Json::String),
    }
}

/// Fills the computed columns a row lacks (rows written before a column was added keep a
/// shorter array). Non-computed missing columns become NULL.
pub fn complete_row(row: &mut Vec<Json>, columns: &[TableColumn], compiled: &[Option<Expr>]) {
    while row.len() < columns.len() {
        let i = row.len();
        let v = match &compiled[i] {
            Some(e) => store(eval(e, row), &columns[i].ty),
            None => Json::Null,
        };
        row.push(v);
    }
}

/// A new row of a Kafka Connect pipeline's table: the static columns by name, NULL for other
/// stored columns, computed columns evaluated in order.
pub fn build_row(
    topic: String,
    id: String,
    record: String,
    columns: &[TableColumn],
    compiled: &[Option<Expr>],
) -> Vec<Json> {
    if columns.is_empty() {
        return vec![Json::String(topic), Json::String(id), Json::String(record)];
    }
    let mut fixed = [Some(topic), Some(id), Some(record)];
    let mut row = Vec::with_capacity(columns.len());
    for (i, c) in columns.iter().enumerate() {
        let v = match (&compiled[i], c.name.as_str()) {
            (Some(e), _) => store(eval(e, &row), &c.ty),
            (None, "topic") => fixed[0].take().map_or(Json::Null, Json::String),
            (None, "id") => fixed[1].take().map_or(Json::Null, Json::String),
            (None, "record") => fixed[2].take().map_or(Json::Null, Json::String),
            (None, _) => Json::Null,
        };
        row.push(v);
    }
    row
}

/// An order-preserving byte encoding of a stored value, for index keys: NULL < numbers <
/// text; integers and doubles each in numeric order, text bytewise (NUL escaped, terminated).
pub fn index_key(v: &Json) -> Vec<u8> {
    match v {
        Json::Null => vec![0x00],
        Json::Bool(b) => index_key(&Json::from(i64::from(*b))),
        Json::Number(n) => match n.as_i64() {
            Some(i) => {
                let mut out = vec![0x10];
                out.extend_from_slice(&((i as u64) ^ (1 << 63)).to_be_bytes());
                out
            }
            None => {
                let f = n.as_f64().unwrap_or(0.0);
                let bits = f.to_bits();
                let ordered = if f.is_sign_negative() {
                    !bits
                } else {
                    bits ^ (1 << 63)
                };
                let mut out = vec![0x20];
                out.extend_from_slice(&ordered.to_be_bytes());
                out
            }
        },
        Json::String(s) => {
            let mut out = vec![0x30];
            for b in s.bytes() {
                if b == 0 {
                    out.extend_from_slice(&[0x00, 0xFF]);
                } else {
                    out.push(b);
                }
            }
            out.push(0x00);
            out.push(0x00);
            out
        }
        other => index_key(&Json::String(other.to_string())),
    }
}

/// Compiles every computed column of a table (`None` for stored ones).
pub fn compile_table(columns: &[TableColumn]) -> Result<Vec<Option<Expr>>, String> {
    columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.computed
                .as_ref()
                .map(|sql| compile(sql, &columns[..i]))
                .transpose()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::tables::Table;

    #[test]
    fn index_keys_keep_order() {
        let ints: Vec<Vec<u8>> = [-5i64, -1, 0, 3, 1000]
            .iter()
            .map(|i| index_key(&Json::from(*i)))
            .collect();
        assert!(ints.windows(2).all(|w| w[0] < w[1]));
        let texts: Vec<Vec<u8>> = ["", "a", "ab", "b"]
            .iter()
            .map(|s| index_key(&Json::from(*s)))
            .collect();
        assert!(texts.windows(2).all(|w| w[0] < w[1]));
        let doubles: Vec<Vec<u8>> = [-2.5f64, -0.5, 0.5, 7.25]
            .iter()
            .map(|d| index_key(&Json::from(*d)))
            .collect();
        assert!(doubles.windows(2).all(|w| w[0] < w[1]));
        assert!(index_key(&Json::Null) < ints[0]);
    }

    #[test]
    fn the_spec_computed_columns() {
        let mut t = Table::kafka_connect_static("d", "t", 0);
        for (name, sql, ty) in [
            (
                "partition_key",
                "JSON_EXTRACT_STRING(record, 'partitionKey')",
                ColumnType::Varchar(128),
            ),
            (
                "seq",
                "JSON_EXTRACT_BIGINT(FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')), 'seq')",
                ColumnType::BigInt,
            ),
            (
                "msg",
                "JSON_EXTRACT_STRING(FROM_BASE64(JSON_EXTRACT_STRING(record, 'data')), 'msg')",
                ColumnType::Varchar(512),
            ),
        ] {
            t.columns.push(TableColumn {
                name: name.into(),
                ty,
                nullable: true,
                computed: Some(sql.into()),
            });
        }
        let compiled = compile_table(&t.columns).unwrap();
        let mut row = vec![
            Json::from("kinesis-topic"),
            Json::from(r#"{"partitionKey":"user-c"}"#),
            Json::from(r#"{"data":"eyJzZXEiOjQsIm1zZyI6ImZvdXJ0aCJ9","partitionKey":"user-c"}"#),
        ];
        complete_row(&mut row, &t.columns, &compiled);
        assert_eq!(row[3], Json::from("user-c"));
        assert_eq!(row[4], Json::from(4));
        assert_eq!(row[5], Json::from("fourth"));
        let mut bad = vec![Json::from("t"), Json::from("{}"), Json::from("not json")];
        complete_row(&mut bad, &t.columns, &compiled);
        assert_eq!(&bad[3..], &[Json::Null, Json::Null, Json::Null]);
        assert!(compile("NOW()", &t.columns).is_err());
        assert!(compile("JSON_EXTRACT_STRING(nope, 'a')", &t.columns).is_err());
    }
}
