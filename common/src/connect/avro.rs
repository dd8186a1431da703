//! FORMAT AVRO: a batch of [`SourceRecord`]s travels as one Avro object container whose
//! schema wraps the connector's key and value schemas; the loader decodes it into the static
//! schema's rows (`topic`, `id`, `record`), with keys sorted and bytes as base64.

use super::{ConnectError, SourceRecord};
pub use apache_avro::types::Value;
pub use apache_avro::Schema;
use apache_avro::{Reader, Writer};
use base64::Engine as _;
use serde_json::Value as Json;
use std::io::Write as _;

/// One decoded row of the static schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticRow {
    pub topic: String,
    /// JSON text of the key.
    pub id: String,
    /// JSON text of the value.
    pub record: String,
}

/// The container schema of a batch: `{topic, key, value}`.
pub fn envelope_schema(key: &Schema, value: &Schema) -> Result<Schema, ConnectError> {
    let to_json = |s: &Schema| {
        serde_json::to_value(s).map_err(|e| ConnectError::Config(format!("avro schema: {e}")))
    };
    let envelope = serde_json::json!({
        "type": "record",
        "name": "SourceRecordEnvelope",
        "namespace": "shardline",
        "fields": [
            {"name": "topic", "type": "string"},
            {"name": "key", "type": to_json(key)?},
            {"name": "value", "type": to_json(value)?},
        ]
    });
    Schema::parse(&envelope).map_err(|e| ConnectError::Config(format!("avro schema: {e}")))
}

/// Encodes records as one Avro object container. Takes the records: their key and value move
/// into the container's values, uncopied.
///
/// The first record of a batch is validated against the schema; the rest are not (validation
/// walks every value and cost about 7% of a leaf's CPU). A connector builds every record of a
/// batch with the same code, and a record the encoder cannot write is still an error here, a
/// container it wrote wrongly an error in [`decode_batch`]; each connector's unit tests validate
/// the records it makes.
pub fn encode_batch(
    schema: &Schema,
    records: impl IntoIterator<Item = SourceRecord>,
) -> Result<Vec<u8>, ConnectError> {
    let err = |e: apache_avro::Error| ConnectError::Source(format!("avro encode: {e}"));
    let mut writer = Writer::new(schema, Vec::new()).map_err(err)?;
    for (i, r) in records.into_iter().enumerate() {
        let value = Value::Record(vec![
            ("topic".into(), Value::String(r.topic)),
            ("key".into(), r.key),
            ("value".into(), r.value),
        ]);
        if i == 0 {
            writer.append_value_ref(&value).map_err(err)?;
        } else {
            writer.unvalidated_append_value_ref(&value).map_err(err)?;
        }
    }
    writer.into_inner().map_err(err)
}

/// The static-schema rows of records a connector in the leaf made, each checked against the
/// batch's envelope schema: what [`encode_batch`] then [`decode_batch`] would give, without
/// writing and reading a container in between (that round trip was about 30% of a leaf's CPU
/// during a datagen load). A record that does not match the schema is an error.
pub fn rows_of(
    schema: &Schema,
    records: impl IntoIterator<Item = SourceRecord>,
) -> Result<Vec<StaticRow>, ConnectError> {
    // The schema's named types, resolved once per batch (`Value::validate` resolves them again
    // for every record: a tenth of a leaf's CPU during a datagen load).
    let resolved = apache_avro::schema::ResolvedSchema::try_from(schema).map_err(|e| {
        ConnectError::Source(format!(
            "avro: the connector's schema does not resolve: {e}"
        ))
    })?;
    let names = resolved.get_names();
    records
        .into_iter()
        .map(|r| {
            let envelope = Value::Record(vec![
                ("topic".into(), Value::String(r.topic)),
                ("key".into(), r.key),
                ("value".into(), r.value),
            ]);
            if !envelope.validate_with_names(schema, names) {
                return Err(ConnectError::Source(
                    "avro: a record does not match the connector's schema".into(),
                ));
            }
            let Value::Record(mut fields) = envelope else {
                unreachable!("built as a record above")
            };
            let (value, key, topic) = (fields.pop(), fields.pop(), fields.pop());
            match (topic, key, value) {
                (Some((_, Value::String(topic))), Some((_, key)), Some((_, value))) => {
                    Ok(StaticRow {
                        topic,
                        id: canonical_avro_json(&key),
                        record: canonical_avro_json(&value),
                    })
                }
                _ => unreachable!("built with these three fields above"),
            }
        })
        .collect()
}

/// Decodes an Avro object container into static-schema rows.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<StaticRow>, ConnectError> {
    let err = |e: apache_avro::Error| ConnectError::Source(format!("avro decode: {e}"));
    let reader = Reader::new(bytes).map_err(err)?;
    let mut rows = Vec::new();
    for value in reader {
        let Value::Record(fields) = value.map_err(err)? else {
            return Err(ConnectError::Source(
                "avro decode: expected a record".into(),
            ));
        };
        let mut topic = None;
        let mut id = None;
        let mut record = None;
        for (name, v) in fields {
            match (name.as_str(), v) {
                ("topic", Value::String(t)) => topic = Some(t),
                ("key", v) => id = Some(canonical_avro_json(&v)),
                ("value", v) => record = Some(canonical_avro_json(&v)),
                _ => {}
            }
        }
        let (Some(topic), Some(id), Some(record)) = (topic, id, record) else {
            return Err(ConnectError::Source(
                "avro decode: envelope fields missing".into(),
            ));
        };
        rows.push(StaticRow { topic, id, record });
    }
    Ok(rows)
}

/// An Avro value as JSON: bytes become base64 text, unions their branch.
pub fn to_json(v: Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Boolean(b) => Json::Bool(b),
        Value::Int(i) | Value::Date(i) | Value::TimeMillis(i) => Json::from(i),
        Value::Long(l)
        | Value::TimeMicros(l)
        | Value::TimestampMillis(l)
        | Value::TimestampMicros(l)
        | Value::LocalTimestampMillis(l)
        | Value::LocalTimestampMicros(l) => Json::from(l),
        Value::Float(f) => {
            serde_json::Number::from_f64(f64::from(f)).map_or(Json::Null, Json::Number)
        }
        Value::Double(d) => serde_json::Number::from_f64(d).map_or(Json::Null, Json::Number),
        Value::Bytes(b) | Value::Fixed(_, b) => {
            Json::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
        Value::String(s) | Value::Enum(_, s) => Json::String(s),
        Value::Union(_, inner) => to_json(*inner),
        Value::Array(items) => Json::Array(items.into_iter().map(to_json).collect()),
        Value::Map(m) => Json::Object(m.into_iter().map(|(k, v)| (k, to_json(v))).collect()),
        Value::Record(fields) => {
            Json::Object(fields.into_iter().map(|(k, v)| (k, to_json(v))).collect())
        }
        other => Json::String(format!("{other:?}")),
    }
}

/// `canonical_json(&to_json(v))` written straight from the Avro value, without building the
/// JSON tree: the loader's hot path (one call per record key and value).
pub fn canonical_avro_json(v: &Value) -> String {
    let mut out = Vec::with_capacity(256);
    write_avro_canonical(v, &mut out);
    // Every piece written is UTF-8: JSON punctuation, numbers and serde_json-escaped strings.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn write_json_str(s: &str, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail, and a &str always serializes.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn write_avro_canonical(v: &Value, out: &mut Vec<u8>) {
    let number =
        |n: serde_json::Number, out: &mut Vec<u8>| out.extend_from_slice(n.to_string().as_bytes());
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Int(i) | Value::Date(i) | Value::TimeMillis(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Long(l)
        | Value::TimeMicros(l)
        | Value::TimestampMillis(l)
        | Value::TimestampMicros(l)
        | Value::LocalTimestampMillis(l)
        | Value::LocalTimestampMicros(l) => {
            let _ = write!(out, "{l}");
        }
        Value::Float(f) => match serde_json::Number::from_f64(f64::from(*f)) {
            Some(n) => number(n, out),
            None => out.extend_from_slice(b"null"),
        },
        Value::Double(d) => match serde_json::Number::from_f64(*d) {
            Some(n) => number(n, out),
            None => out.extend_from_slice(b"null"),
        },
        Value::Bytes(b) | Value::Fixed(_, b) => {
            // Base64 needs no JSON escaping.
            out.push(b'"');
            let start = out.len();
            out.resize(start + base64::encoded_len(b.len(), true).unwrap_or(0), 0);
            let n = base64::engine::general_purpose::STANDARD
                .encode_slice(b, &mut out[start..])
                .unwrap_or(0);
            out.truncate(start + n);
            out.push(b'"');
        }
        Value::String(s) | Value::Enum(_, s) => write_json_str(s, out),
        Value::Union(_, inner) => write_avro_canonical(inner, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_avro_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Map(m) => {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            write_object(entries, out);
        }
        Value::Record(fields) => {
            let mut entries: Vec<(&String, &Value)> = fields.iter().map(|(k, v)| (k, v)).collect();
            // A record's fields are unique; a stable sort keeps to_json's last-wins otherwise.
            entries.sort_by(|a, b| a.0.cmp(b.0));
            entries.dedup_by(|later, earlier| {
                let same = later.0 == earlier.0;
                if same {
                    earlier.1 = later.1;
                }
                same
            });
            write_object(entries, out);
        }
        other => write_json_str(&format!("{other:?}"), out),
    }
}

fn write_object(entries: Vec<(&String, &Value)>, out: &mut Vec<u8>) {
    out.push(b'{');
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_str(k, out);
        out.push(b':');
        write_avro_canonical(v, out);
    }
    out.push(b'}');
}

/// Compact JSON text with object keys sorted, whatever the map type preserves.
pub fn canonical_json(v: &Json) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Json, out: &mut String) {
    match v {
        Json::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Json::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&m[k], out);
            }
            out.push('}');
        }
        Json::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schema_naming_an_undefined_type_is_an_error_not_a_panic() {
        // Built, not parsed: the parser refuses it, a connector's code need not.
        let schema = Schema::Ref {
            name: apache_avro::schema::Name::new("Undefined").unwrap(),
        };
        let rec = SourceRecord {
            topic: "t".into(),
            key: Value::Null,
            value: Value::Null,
            source_partition: "{}".into(),
            source_offset: Json::Null,
            size: 1,
        };
        let err = rows_of(&schema, [rec]).unwrap_err().to_string();
        assert!(err.contains("does not resolve"), "{err}");
    }

    #[test]
    fn roundtrip_sorts_keys_and_base64s_bytes() {
        let key = Schema::parse_str(
            r#"{"type":"record","name":"K","fields":[{"name":"partitionKey","type":"string"}]}"#,
        )
        .unwrap();
        let value = Schema::parse_str(r#"{"type":"record","name":"V","fields":[{"name":"zeta","type":"long"},{"name":"data","type":"bytes"}]}"#).unwrap();
        let schema = envelope_schema(&key, &value).unwrap();
        let rec = SourceRecord {
            topic: "t".into(),
            key: Value::Record(vec![(
                "partitionKey".into(),
                Value::String("user-c".into()),
            )]),
            value: Value::Record(vec![
                ("zeta".into(), Value::Long(1775700271554)),
                (
                    "data".into(),
                    Value::Bytes(br#"{"seq":4,"msg":"fourth"}"#.to_vec()),
                ),
            ]),
            source_partition: "{}".into(),
            source_offset: Json::Null,
            size: 1,
        };
        let bytes = encode_batch(&schema, [rec.clone(), rec.clone()]).unwrap();
        let rows = decode_batch(&bytes).unwrap();
        // The records straight to rows: what the container round trip gives.
        assert_eq!(rows_of(&schema, [rec.clone(), rec.clone()]).unwrap(), rows);
        // A record that does not match its schema (a string where a long belongs) is an error,
        // also when it is not the batch's first.
        let mut bad = rec.clone();
        bad.value = Value::Record(vec![
            ("zeta".into(), Value::String("not a long".into())),
            ("data".into(), Value::Bytes(vec![])),
        ]);
        let err = rows_of(&schema, [rec, bad]).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].topic, "t");
        assert_eq!(rows[0].id, r#"{"partitionKey":"user-c"}"#);
        assert_eq!(
            rows[0].record,
            r#"{"data":"eyJzZXEiOjQsIm1zZyI6ImZvdXJ0aCJ9","zeta":1775700271554}"#
        );
        assert!(decode_batch(b"not avro").is_err());
    }

    #[test]
    fn a_later_record_that_does_not_match_the_schema_is_still_an_error() {
        let key = Schema::parse_str(
            r#"{"type":"record","name":"K","fields":[{"name":"k","type":"string"}]}"#,
        )
        .unwrap();
        let value = Schema::parse_str(
            r#"{"type":"record","name":"V","fields":[{"name":"n","type":"long"}]}"#,
        )
        .unwrap();
        let schema = envelope_schema(&key, &value).unwrap();
        let record = |k: Value, v: Value| SourceRecord {
            topic: "t".into(),
            key: Value::Record(vec![("k".into(), k)]),
            value: Value::Record(vec![("n".into(), v)]),
            source_partition: "{}".into(),
            source_offset: Json::Null,
            size: 1,
        };
        let good = || record(Value::String("a".into()), Value::Long(1));
        for bad in [
            record(
                Value::String("a".into()),
                Value::String("not a long".into()),
            ),
            record(Value::Long(1), Value::Long(1)),
            SourceRecord {
                value: Value::Record(vec![]),
                ..good()
            },
        ] {
            for batch in [vec![bad.clone()], vec![good(), bad.clone()]] {
                let result = encode_batch(&schema, batch).and_then(|b| decode_batch(&b));
                assert!(result.is_err(), "{bad:?} was written");
            }
        }
    }

    #[test]
    fn the_direct_writer_matches_the_json_tree_path() {
        let values = vec![
            Value::Null,
            Value::Boolean(true),
            Value::Int(-7),
            Value::Long(i64::MIN),
            Value::TimestampMillis(1775700271554),
            Value::Float(1.5),
            Value::Float(f32::NAN),
            Value::Double(1e300),
            Value::Double(-0.0),
            Value::Double(f64::INFINITY),
            Value::String("quote \" back \\ nl \n tab \t ctl \u{1} é 😀".into()),
            Value::Bytes(vec![]),
            Value::Bytes((0..=255).collect()),
            Value::Fixed(3, vec![1, 2, 3]),
            Value::Enum(1, "B".into()),
            Value::Union(1, Box::new(Value::String("x".into()))),
            Value::Uuid(apache_avro::Uuid::nil()),
            Value::Array(vec![Value::Int(1), Value::Null, Value::Array(vec![])]),
            Value::Map(
                [
                    ("z", Value::Int(1)),
                    ("a", Value::Bytes(b"hi".to_vec())),
                    ("\"q", Value::Null),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            ),
            Value::Record(vec![
                ("zeta".into(), Value::Long(1)),
                (
                    "alpha".into(),
                    Value::Record(vec![
                        ("b".into(), Value::Int(2)),
                        ("a".into(), Value::Int(1)),
                    ]),
                ),
                ("zeta".into(), Value::Long(2)),
                ("mid".into(), Value::Map(Default::default())),
            ]),
        ];
        for v in values {
            assert_eq!(
                canonical_avro_json(&v),
                canonical_json(&to_json(v.clone())),
                "{v:?}"
            );
        }
    }
}
