//! SingleStore's JSON and base64 functions as DataFusion scalar UDFs.
//!
//! `JSON_EXTRACT_<type>(json, key_or_index, ...)`: the path is a list of object keys or
//! zero-based array indexes. SQL NULL when an argument is NULL, the JSON is invalid, the path
//! is missing, or the value is JSON null. STRING unquotes JSON strings and gives other values
//! as JSON text; BIGINT gives true/false as 1/0, rounds floats and gives 0 for strings;
//! DOUBLE likewise without rounding; JSON gives JSON text. Arrays and objects are NULL for
//! BIGINT and DOUBLE. The JSON argument may be binary (e.g. `FROM_BASE64(...)`): it is read
//! as UTF-8, and invalid UTF-8 is invalid JSON.

use base64::Engine as _;
use common::json::{extract, from_base64, Extracted, JsonKind};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, Float64Array, Int64Array, StringArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::error::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use std::sync::Arc;

/// Any string or binary array as UTF-8 strings (invalid UTF-8 becomes NULL).
fn as_utf8(col: &ArrayRef) -> Result<Vec<Option<String>>> {
    Ok(match col.data_type() {
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
            let b = cast(col, &DataType::Binary)?;
            b.as_binary::<i32>()
                .iter()
                .map(|v| v.and_then(|b| std::str::from_utf8(b).ok().map(str::to_owned)))
                .collect()
        }
        DataType::Utf8 => col
            .as_string::<i32>()
            .iter()
            .map(|v| v.map(str::to_owned))
            .collect(),
        _ => {
            let s = cast(col, &DataType::Utf8)?;
            s.as_string::<i32>()
                .iter()
                .map(|v| v.map(str::to_owned))
                .collect()
        }
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonExtract {
    name: &'static str,
    kind: JsonKind,
    signature: Signature,
}

impl ScalarUDFImpl for JsonExtract {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(match self.kind {
            JsonKind::String | JsonKind::Json => DataType::Utf8,
            JsonKind::BigInt => DataType::Int64,
            JsonKind::Double => DataType::Float64,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        if args.args.len() < 2 {
            return Err(datafusion::error::DataFusionError::Plan(format!(
                "{} needs a JSON value and at least one key or index",
                self.name.to_ascii_uppercase()
            )));
        }
        let cols: Vec<Vec<Option<String>>> = args
            .args
            .iter()
            .map(|a| a.to_array(n).and_then(|a| as_utf8(&a)))
            .collect::<Result<_>>()?;
        let rows = (0..n).map(|i| {
            let json = cols[0][i].as_deref()?;
            let path: Option<Vec<&str>> = cols[1..].iter().map(|c| c[i].as_deref()).collect();
            extract(json, &path?, self.kind)
        });
        let array: ArrayRef = match self.kind {
            JsonKind::String | JsonKind::Json => Arc::new(
                rows.map(|v| match v {
                    Some(Extracted::Text(s)) => Some(s),
                    _ => None,
                })
                .collect::<StringArray>(),
            ),
            JsonKind::BigInt => Arc::new(
                rows.map(|v| match v {
                    Some(Extracted::Int(i)) => Some(i),
                    _ => None,
                })
                .collect::<Int64Array>(),
            ),
            JsonKind::Double => Arc::new(
                rows.map(|v| match v {
                    Some(Extracted::Double(d)) => Some(d),
                    _ => None,
                })
                .collect::<Float64Array>(),
            ),
        };
        Ok(ColumnarValue::Array(array))
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Base64 {
    decode: bool,
    signature: Signature,
}

impl ScalarUDFImpl for Base64 {
    fn name(&self) -> &str {
        if self.decode {
            "from_base64"
        } else {
            "to_base64"
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(if self.decode {
            DataType::Binary
        } else {
            DataType::Utf8
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let col = args.args[0].to_array(n)?;
        let array: ArrayRef = if self.decode {
            let input = as_utf8(&col)?;
            Arc::new(
                input
                    .iter()
                    .map(|v| v.as_deref().and_then(from_base64))
                    .collect::<BinaryArray>(),
            )
        } else {
            let bytes: Vec<Option<Vec<u8>>> = match col.data_type() {
                DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
                    let b = cast(&col, &DataType::Binary)?;
                    b.as_binary::<i32>()
                        .iter()
                        .map(|v| v.map(<[u8]>::to_vec))
                        .collect()
                }
                _ => as_utf8(&col)?
                    .into_iter()
                    .map(|v| v.map(String::into_bytes))
                    .collect(),
            };
            Arc::new(
                bytes
                    .iter()
                    .map(|v| {
                        v.as_ref()
                            .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
                    })
                    .collect::<StringArray>(),
            )
        };
        Ok(ColumnarValue::Array(array))
    }
}

/// MySQL's `LENGTH`/`OCTET_LENGTH`: bytes, of strings and binary alike.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ByteLength {
    name: &'static str,
    signature: Signature,
}

impl ScalarUDFImpl for ByteLength {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let col = args.args[0].to_array(args.number_rows)?;
        let lengths: Int64Array = match col.data_type() {
            DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
                let b = cast(&col, &DataType::Binary)?;
                b.as_binary::<i32>()
                    .iter()
                    .map(|v| v.map(|b| b.len() as i64))
                    .collect()
            }
            _ => {
                let s = cast(&col, &DataType::Utf8)?;
                s.as_string::<i32>()
                    .iter()
                    .map(|v| v.map(|s| s.len() as i64))
                    .collect()
            }
        };
        Ok(ColumnarValue::Array(Arc::new(lengths)))
    }
}

/// Every function Shardline adds to DataFusion.
pub fn udfs() -> Vec<ScalarUDF> {
    let json = |name, kind| {
        ScalarUDF::new_from_impl(JsonExtract {
            name,
            kind,
            signature: Signature::variadic_any(Volatility::Immutable),
        })
    };
    let b64 = |decode| {
        ScalarUDF::new_from_impl(Base64 {
            decode,
            signature: Signature::any(1, Volatility::Immutable),
        })
    };
    let len = |name| {
        ScalarUDF::new_from_impl(ByteLength {
            name,
            signature: Signature::any(1, Volatility::Immutable),
        })
    };
    vec![
        len("length"),
        len("octet_length"),
        json("json_extract_string", JsonKind::String),
        json("json_extract_bigint", JsonKind::BigInt),
        json("json_extract_double", JsonKind::Double),
        json("json_extract_json", JsonKind::Json),
        b64(true),
        b64(false),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use Extracted::*;

    const REC: &str = r#"{"approximateArrivalTimestamp":1775700271554,"data":"eyJzZXEiOjQsIm1zZyI6ImZvdXJ0aCJ9","partitionKey":"user-c","n":null,"f":2.5,"neg":-2.5,"t":true,"arr":[10,{"k":"v"}],"o":{"a":1}}"#;

    #[test]
    fn extract_semantics() {
        let s = |p: &[&str]| extract(REC, p, JsonKind::String);
        assert_eq!(s(&["partitionKey"]), Some(Text("user-c".into())));
        assert_eq!(
            s(&["approximateArrivalTimestamp"]),
            Some(Text("1775700271554".into()))
        );
        assert_eq!(s(&["o"]), Some(Text(r#"{"a":1}"#.into())));
        assert_eq!(s(&["arr", "1", "k"]), Some(Text("v".into())));
        assert_eq!(s(&["missing"]), None);
        assert_eq!(s(&["n"]), None, "JSON null is SQL NULL");
        assert_eq!(extract("{bad", &["a"], JsonKind::String), None);
        let b = |p: &[&str]| extract(REC, p, JsonKind::BigInt);
        assert_eq!(
            b(&["approximateArrivalTimestamp"]),
            Some(Int(1775700271554))
        );
        assert_eq!(b(&["f"]), Some(Int(3)));
        assert_eq!(b(&["neg"]), Some(Int(-3)));
        assert_eq!(b(&["t"]), Some(Int(1)));
        assert_eq!(b(&["partitionKey"]), Some(Int(0)));
        assert_eq!(b(&["o"]), None);
        assert_eq!(b(&["arr", "0"]), Some(Int(10)));
        assert_eq!(extract(REC, &["f"], JsonKind::Double), Some(Double(2.5)));
        assert_eq!(
            extract(REC, &["partitionKey"], JsonKind::Json),
            Some(Text("\"user-c\"".into()))
        );
    }

    #[test]
    fn base64_and_the_spec_payload() {
        let data = from_base64("eyJzZXEiOjQsIm1zZyI6ImZvdXJ0aCJ9").unwrap();
        let text = String::from_utf8(data).unwrap();
        assert_eq!(extract(&text, &["seq"], JsonKind::BigInt), Some(Int(4)));
        assert_eq!(
            extract(&text, &["msg"], JsonKind::String),
            Some(Text("fourth".into()))
        );
        assert_eq!(from_base64("!!!"), None);
        assert_eq!(
            from_base64("eyJzZXEiOjUsIm1zZyI6ImZpZnRoIn0=").map(|b| b.len()),
            Some(23)
        );
    }
}
