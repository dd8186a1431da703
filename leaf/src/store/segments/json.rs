//! JSON sub-columns: for each JSON column, a segment keeps the scalar values of the key paths
//! present in most of its rows as typed columns of their own (SingleStore's `SeekableJson`),
//! with min/max like any column. A scan's filter on `JSON_EXTRACT_<type>(col, 'key', ...)`
//! then reads, and skips row groups by, that sub-column alone; the JSON text is decoded only
//! for the rows the filter keeps ([`rewrite`]).
//!
//! A sub-column is only made where it is exact: every row that has the path has a value of one
//! type there (integers, doubles or short strings), so the sub-column holds what
//! `JSON_EXTRACT_<that type>` returns for every row (NULL where the path is missing or null).

use datafusion::arrow::array::{ArrayRef, Float64Builder, Int64Builder, StringBuilder};
use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::common::ScalarValue;
use datafusion::physical_expr::expressions::{Column, Literal};
use datafusion::physical_expr::{PhysicalExpr, ScalarFunctionExpr};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::sync::Arc;

/// Field metadata of a sub-column: its JSON column and its key path (a JSON array).
pub const SOURCE_META: &str = "shardline.json.source";
pub const PATH_META: &str = "shardline.json.path";

/// Deepest key path kept (objects within objects).
const MAX_DEPTH: usize = 3;
/// Most sub-columns per JSON column and segment.
const MAX_SUBCOLUMNS: usize = 32;
/// Longest string a string sub-column holds (longer values stay in the text only).
const MAX_STRING: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SubType {
    BigInt,
    Double,
    String,
}

impl SubType {
    pub fn sql(self) -> &'static str {
        match self {
            SubType::BigInt => "BIGINT",
            SubType::Double => "DOUBLE",
            SubType::String => "STRING",
        }
    }

    pub fn arrow(self) -> DataType {
        match self {
            SubType::BigInt => DataType::Int64,
            SubType::Double => DataType::Float64,
            SubType::String => DataType::Utf8,
        }
    }

    /// The type of sub-column that holds what `function` returns.
    pub fn of_function(function: &str) -> Option<SubType> {
        [SubType::BigInt, SubType::Double, SubType::String]
            .into_iter()
            .find(|t| t.function() == function)
    }

    /// The function whose value this sub-column holds.
    fn function(self) -> &'static str {
        match self {
            SubType::BigInt => "json_extract_bigint",
            SubType::Double => "json_extract_double",
            SubType::String => "json_extract_string",
        }
    }
}

/// One sub-column of a segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubColumn {
    /// The JSON column's name.
    pub source: String,
    pub path: Vec<String>,
    pub ty: SubType,
    /// Rows with a value at the path.
    pub present: u64,
}

impl SubColumn {
    /// Its column name in a segment: reserved (MySQL identifiers cannot hold NUL), so no
    /// table column and no other path (keys may hold dots) has it.
    pub fn field_name(&self) -> String {
        format!(
            "\0json\0{}\0{}",
            self.source,
            serde_json::to_string(&self.path).unwrap_or_default()
        )
    }

    pub fn field(&self) -> Field {
        Field::new(self.field_name(), self.ty.arrow(), true).with_metadata(HashMap::from([
            (SOURCE_META.to_string(), self.source.clone()),
            (
                PATH_META.to_string(),
                serde_json::to_string(&self.path).unwrap_or_default(),
            ),
        ]))
    }

    /// The sub-column a field describes, if it is one.
    pub fn of_field(f: &Field) -> Option<(String, Vec<String>)> {
        let source = f.metadata().get(SOURCE_META)?.clone();
        let path = serde_json::from_str(f.metadata().get(PATH_META)?).ok()?;
        Some((source, path))
    }
}

/// A segment file's sub-columns by JSON column, key path and type: each one's field name and
/// index in the file.
pub type FileSubColumns = HashMap<(String, Vec<String>, SubType), (String, usize)>;

/// The sub-columns a segment file's schema holds.
pub fn file_sub_columns(file: &datafusion::arrow::datatypes::Schema) -> FileSubColumns {
    file.fields()
        .iter()
        .enumerate()
        .filter_map(|(i, f)| {
            let (source, path) = SubColumn::of_field(f)?;
            let ty = [SubType::BigInt, SubType::Double, SubType::String]
                .into_iter()
                .find(|t| t.arrow() == *f.data_type())?;
            Some(((source, path, ty), (f.name().clone(), i)))
        })
        .collect()
}

#[derive(Default)]
struct Counts {
    ints: u64,
    floats: u64,
    strings: u64,
    other: u64,
    longest: usize,
}

/// Counts the key paths and value types of one JSON column over a segment's rows.
#[derive(Default)]
pub struct Inference {
    rows: u64,
    paths: HashMap<Vec<String>, Counts>,
}

fn walk(v: &Json, path: &mut Vec<String>, f: &mut impl FnMut(&[String], &Json)) {
    let Json::Object(map) = v else { return };
    for (k, child) in map {
        path.push(k.clone());
        f(path, child);
        if path.len() < MAX_DEPTH {
            walk(child, path, f);
        }
        path.pop();
    }
}

impl Inference {
    /// Counts one row's JSON text (invalid JSON counts as a row without paths).
    pub fn add(&mut self, text: Option<&str>) {
        self.add_value(parse(text).as_ref());
    }

    /// Counts one row's JSON value, parsed ([`parse`]).
    pub fn add_value(&mut self, v: Option<&Json>) {
        self.rows += 1;
        let Some(v) = v else {
            return;
        };
        let paths = &mut self.paths;
        walk(v, &mut Vec::new(), &mut |path, value| {
            let c = paths.entry(path.to_vec()).or_default();
            match value {
                Json::Null => {}
                Json::Number(n) if n.is_i64() => c.ints += 1,
                Json::Number(_) => c.floats += 1,
                Json::String(s) => {
                    c.strings += 1;
                    c.longest = c.longest.max(s.len());
                }
                _ => c.other += 1,
            }
        });
    }

    /// The sub-columns worth keeping: paths with a value in at least half the rows, all of
    /// one type.
    pub fn sub_columns(&self, source: &str) -> Vec<SubColumn> {
        let mut out: Vec<SubColumn> = self
            .paths
            .iter()
            // JSON_EXTRACT reads a key that is a number as an array index where the value is
            // an array: such a path means different things in different rows.
            .filter(|(path, _)| !path.iter().any(|k| k.trim().parse::<usize>().is_ok()))
            .filter_map(|(path, c)| {
                let present = c.ints + c.floats + c.strings;
                if c.other > 0 || present == 0 || present * 2 < self.rows {
                    return None;
                }
                let ty = if c.strings == present && c.longest <= MAX_STRING {
                    SubType::String
                } else if c.ints == present {
                    SubType::BigInt
                } else if c.strings == 0 {
                    SubType::Double
                } else {
                    return None;
                };
                Some(SubColumn {
                    source: source.to_string(),
                    path: path.clone(),
                    ty,
                    present,
                })
            })
            .collect();
        out.sort_by(|a, b| b.present.cmp(&a.present).then(a.path.cmp(&b.path)));
        out.truncate(MAX_SUBCOLUMNS);
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }
}

fn at<'a>(mut v: &'a Json, path: &[String]) -> Option<&'a Json> {
    for k in path {
        v = v.as_object()?.get(k)?;
    }
    Some(v)
}

/// A JSON text as a value (`None` for NULL and for invalid JSON).
pub fn parse(text: Option<&str>) -> Option<Json> {
    text.and_then(|t| serde_json::from_str::<Json>(t).ok())
}

/// Whether two lists of sub-columns are the same columns (their counts aside).
pub fn same_columns(a: &[SubColumn], b: &[SubColumn]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.source == y.source && x.path == y.path && x.ty == y.ty)
}

/// The arrays of `subs` (all of one JSON column) for rows' JSON values ([`parse`]).
pub fn extract_values(subs: &[SubColumn], values: &[Option<Json>]) -> Vec<ArrayRef> {
    enum B {
        I(Int64Builder),
        F(Float64Builder),
        S(StringBuilder),
    }
    let mut builders: Vec<B> = subs
        .iter()
        .map(|s| match s.ty {
            SubType::BigInt => B::I(Int64Builder::with_capacity(values.len())),
            SubType::Double => B::F(Float64Builder::with_capacity(values.len())),
            SubType::String => B::S(StringBuilder::new()),
        })
        .collect();
    for v in values {
        for (s, b) in subs.iter().zip(builders.iter_mut()) {
            let value = v.as_ref().and_then(|v| at(v, &s.path));
            match b {
                B::I(b) => b.append_option(value.and_then(Json::as_i64)),
                B::F(b) => b.append_option(value.and_then(Json::as_f64)),
                B::S(b) => b.append_option(value.and_then(Json::as_str)),
            }
        }
    }
    builders
        .into_iter()
        .map(|b| -> ArrayRef {
            match b {
                B::I(mut b) => Arc::new(b.finish()),
                B::F(mut b) => Arc::new(b.finish()),
                B::S(mut b) => Arc::new(b.finish()),
            }
        })
        .collect()
}

/// `expr` with each `JSON_EXTRACT_<type>(column, 'key', ...)` that a sub-column answers
/// replaced by that sub-column (`sub` gives its column for a JSON column name, path and
/// type); `None` unless every column `expr` reads is then a sub-column.
/// The sub-column a segment keeps for a JSON column, key path and type, if any.
pub type SubLookup<'a> = &'a dyn Fn(&str, &[String], SubType) -> Option<Column>;

pub fn rewrite(expr: &Arc<dyn PhysicalExpr>, sub: SubLookup<'_>) -> Option<Arc<dyn PhysicalExpr>> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    if volatile(expr) {
        return None; // evaluated here and again above: a second draw could differ
    }
    let mut introduced = std::collections::HashSet::new();
    let rewritten = Arc::clone(expr)
        .transform_down(|e| {
            let Some(f) = e.downcast_ref::<ScalarFunctionExpr>() else {
                return Ok(Transformed::no(e));
            };
            let ty = SubType::of_function(f.name());
            let (Some(ty), [col, keys @ ..]) = (ty, f.args()) else {
                return Ok(Transformed::no(e));
            };
            let Some(col) = col.downcast_ref::<Column>() else {
                return Ok(Transformed::no(e));
            };
            let path: Option<Vec<String>> = keys
                .iter()
                .map(|k| match k.downcast_ref::<Literal>()?.value() {
                    ScalarValue::Utf8(Some(s)) => Some(s.clone()),
                    _ => None,
                })
                .collect();
            match path
                .filter(|p| !p.is_empty())
                .and_then(|p| sub(col.name(), &p, ty))
            {
                Some(c) => {
                    introduced.insert(c.name().to_string());
                    Ok(Transformed::new(
                        Arc::new(c) as _,
                        true,
                        TreeNodeRecursion::Jump,
                    ))
                }
                None => Ok(Transformed::no(e)),
            }
        })
        .data()
        .ok()?;
    let columns = datafusion::physical_expr::utils::collect_columns(&rewritten);
    (!columns.is_empty() && columns.iter().all(|c| introduced.contains(c.name())))
        .then_some(rewritten)
}

/// Whether `expr` calls a function whose value may change between calls (`RAND()`).
fn volatile(expr: &Arc<dyn PhysicalExpr>) -> bool {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let mut found = false;
    let _ = expr.apply(|e| {
        if let Some(f) = e.downcast_ref::<ScalarFunctionExpr>() {
            if f.fun().signature().volatility == datafusion::logical_expr::Volatility::Volatile {
                found = true;
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_in_most_rows_with_one_type_become_sub_columns() {
        let mut inf = Inference::default();
        for i in 0..10 {
            let text = if i < 7 {
                format!(
                    r#"{{"seq":{i},"msg":"m{i}","f":{i}.5,"mixed":{},"o":{{"k":"v{i}"}},"n":null}}"#,
                    if i % 2 == 0 { "1" } else { "\"x\"" }
                )
            } else {
                r#"{"other":true}"#.to_string()
            };
            inf.add(Some(&text));
        }
        inf.add(Some("not json"));
        let subs = inf.sub_columns("record");
        let got: Vec<(String, SubType, u64)> = subs
            .iter()
            .map(|s| (s.path.join("."), s.ty, s.present))
            .collect();
        assert_eq!(
            got,
            vec![
                ("f".to_string(), SubType::Double, 7),
                ("msg".to_string(), SubType::String, 7),
                ("o.k".to_string(), SubType::String, 7),
                ("seq".to_string(), SubType::BigInt, 7),
            ]
        );
        let values = [
            Some(r#"{"seq":5,"o":{"k":"a"}}"#),
            Some(r#"{"seq":null}"#),
            None,
        ]
        .map(parse);
        let arrays = extract_values(&subs, &values);
        let seq = arrays[3]
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Int64Array>()
            .unwrap();
        assert_eq!(seq.iter().collect::<Vec<_>>(), vec![Some(5), None, None]);
    }

    #[test]
    fn keys_that_read_as_indexes_or_hold_dots_stay_unambiguous() {
        let mut inf = Inference::default();
        for _ in 0..4 {
            inf.add(Some(r#"{"a":{"0":1,"b":2},"a.b":5}"#));
        }
        let subs = inf.sub_columns("record");
        let paths: Vec<Vec<String>> = subs.iter().map(|s| s.path.clone()).collect();
        assert_eq!(
            paths,
            vec![
                vec!["a".to_string(), "b".to_string()],
                vec!["a.b".to_string()]
            ],
            "no path through a numeric key (an array index where the value is an array)"
        );
        assert_ne!(subs[0].field_name(), subs[1].field_name());
    }
}
