//! SingleStore's JSON and base64 function semantics, shared by the query engine (DataFusion
//! UDFs on the aggregator) and computed columns (evaluated on leaves).
//!
//! `JSON_EXTRACT_<type>(json, key_or_index, ...)`: the path is a list of object keys or
//! zero-based array indexes. SQL NULL when an argument is NULL, the JSON is invalid, the path
//! is missing, or the value is JSON null. STRING unquotes JSON strings and gives other values
//! as JSON text; BIGINT gives true/false as 1/0, rounds floats and gives 0 for strings;
//! DOUBLE likewise without rounding; JSON gives JSON text. Arrays and objects are NULL for
//! BIGINT and DOUBLE.

use base64::Engine as _;
use serde_json::Value as Json;

/// What a `JSON_EXTRACT_*` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JsonKind {
    String,
    BigInt,
    Double,
    Json,
}

/// Follows a path of keys / indexes. `None` when missing.
pub fn json_path<'a>(mut v: &'a Json, path: &[&str]) -> Option<&'a Json> {
    for key in path {
        v = match v {
            Json::Object(m) => m.get(*key)?,
            Json::Array(a) => a.get(key.trim().parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// The scalar semantics, on one row.
pub fn extract(json: &str, path: &[&str], kind: JsonKind) -> Option<Extracted> {
    let doc: Json = serde_json::from_str(json).ok()?;
    let v = json_path(&doc, path)?;
    if v.is_null() {
        return None;
    }
    Some(match kind {
        JsonKind::String => Extracted::Text(match v {
            Json::String(s) => s.clone(),
            other => other.to_string(),
        }),
        JsonKind::Json => Extracted::Text(v.to_string()),
        JsonKind::BigInt => Extracted::Int(match v {
            Json::Bool(b) => i64::from(*b),
            Json::Number(n) => n
                .as_i64()
                .or_else(|| n.as_f64().map(|f| f.round() as i64))
                .unwrap_or(0),
            Json::String(_) => 0,
            _ => return None,
        }),
        JsonKind::Double => Extracted::Double(match v {
            Json::Bool(b) => f64::from(u8::from(*b)),
            Json::Number(n) => n.as_f64().unwrap_or(0.0),
            Json::String(_) => 0.0,
            _ => return None,
        }),
    })
}

/// One extracted value.
#[derive(Debug, Clone, PartialEq)]
pub enum Extracted {
    Text(String),
    Int(i64),
    Double(f64),
}

/// `FROM_BASE64`: NULL on NULL or invalid input (whitespace is ignored).
pub fn from_base64(s: &str) -> Option<Vec<u8>> {
    let clean: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(clean).ok()
}
