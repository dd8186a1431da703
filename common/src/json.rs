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

/// The value at `path` in the JSON text `json`, the whole text checked as
/// `serde_json::from_str::<Json>` checks it (`None` when invalid or missing), but only the
/// value at the path built: the rest is parsed and dropped as it goes, with no tree of maps
/// and strings (a row's JSON is parsed once per extraction, and records reach 1 MiB).
pub fn value_at(json: &str, path: &[&str]) -> Option<Json> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_str(json);
    let v = path::At(path).deserialize(&mut de).ok()?;
    de.end().ok()?;
    v
}

/// The scalar semantics, on one row.
pub fn extract(json: &str, path: &[&str], kind: JsonKind) -> Option<Extracted> {
    let v = &value_at(json, path)?;
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

/// [`value_at`]'s parse: serde seeds that follow the path and consume everything else with
/// `deserialize_any` (numbers, strings and escapes checked as when building a [`Json`];
/// serde_json's `IgnoredAny` skips more leniently), the last of duplicate keys winning.
mod path {
    use super::Json;
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    /// The value at a path (`None` when missing or when the path goes into a scalar).
    pub struct At<'p>(pub &'p [&'p str]);

    impl<'de> DeserializeSeed<'de> for At<'_> {
        type Value = Option<Json>;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            match self.0.split_first() {
                None => serde::Deserialize::deserialize(d).map(Some),
                Some((key, rest)) => d.deserialize_any(Step { key, rest }),
            }
        }
    }

    /// One step down: `key` into an object, or as an index into an array.
    struct Step<'p> {
        key: &'p str,
        rest: &'p [&'p str],
    }

    impl<'de> Visitor<'de> for Step<'_> {
        type Value = Option<Json>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON value")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(matches) = map.next_key_seed(KeyIs(self.key))? {
                if matches {
                    found = map.next_value_seed(At(self.rest))?;
                } else {
                    map.next_value_seed(Skip)?;
                }
            }
            Ok(found)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let index = self.key.trim().parse::<usize>().ok();
            let (mut found, mut i) = (None, 0);
            loop {
                if Some(i) == index {
                    match seq.next_element_seed(At(self.rest))? {
                        Some(v) => found = v,
                        None => break,
                    }
                } else if seq.next_element_seed(Skip)?.is_none() {
                    break;
                }
                i += 1;
            }
            Ok(found)
        }

        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }

    /// Whether an object key is the one wanted (no key is copied).
    struct KeyIs<'k>(&'k str);

    impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
        type Value = bool;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for KeyIs<'_> {
        type Value = bool;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object key")
        }

        fn visit_str<E>(self, v: &str) -> Result<bool, E> {
            Ok(v == self.0)
        }
    }

    /// A value parsed and dropped.
    struct Skip;

    impl<'de> DeserializeSeed<'de> for Skip {
        type Value = ();

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Skip {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON value")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while map.next_key_seed(KeyIs(""))?.is_some() {
                map.next_value_seed(Skip)?;
            }
            Ok(())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Skip)?.is_some() {}
            Ok(())
        }

        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What `value_at` must equal: the whole document built, then the path followed.
    fn built(json: &str, path: &[&str]) -> Option<Json> {
        let doc: Json = serde_json::from_str(json).ok()?;
        json_path(&doc, path).cloned()
    }

    #[test]
    fn value_at_agrees_with_building_the_document() {
        let docs = [
            r#"{"a":1,"b":{"c":[10,{"d":"x"},30]},"e":null}"#,
            r#"{"a":1,"a":{"x":2}}"#,
            r#"{"a":{"x":2},"a":3}"#,
            r#"{"skip":"\ud800","a":1}"#,
            r#"{"skip":1e400,"a":1}"#,
            r#"{"skip":"\u00e9\n","a":"\u00e9"}"#,
            r#"{"a":1} trailing"#,
            r#"{"a":1}  "#,
            r#"{"a":[1,2,"#,
            r#"[[0,1],[2,3]]"#,
            r#""text""#,
            r#"17"#,
            r#"{"a":-0.5e-3,"b":18446744073709551615,"c":-9223372036854775808}"#,
            r#"{"k\"ey":1,"":2}"#,
            "{\"a\":[1,2,3],\"b\":true,\"c\":false,\"d\":[]}",
            "",
            "{bad",
        ];
        let paths: [&[&str]; 14] = [
            &[],
            &["a"],
            &["a", "x"],
            &["b", "c", "1", "d"],
            &["b", "c", " 2 "],
            &["b", "c", "3"],
            &["e"],
            &["missing"],
            &["1", "0"],
            &["0"],
            &["k\"ey"],
            &[""],
            &["a", "0"],
            &["b", "x"],
        ];
        for doc in docs {
            for path in paths {
                assert_eq!(value_at(doc, path), built(doc, path), "{doc:?} at {path:?}");
            }
        }
        // Nesting past serde_json's recursion limit is invalid either way.
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(value_at(&deep, &["0"]), None);
        assert_eq!(built(&deep, &["0"]), None);
    }
}
