//! Table rows as Arrow: the schema of a table's columns and the record batches leaves send to
//! the aggregator (Arrow IPC stream bytes over gRPC).

use crate::catalog::tables::{ColumnType, TableColumn};
use arrow_array::{
    ArrayRef, BinaryArray, Float64Array, Int64Array, RecordBatch, RecordBatchOptions, StringArray,
};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef};
use base64::Engine as _;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::sync::Arc;

/// Field metadata key telling the MySQL layer a text column is JSON.
pub const MYSQL_TYPE: &str = "mysql.type";

/// The Arrow field of a column.
pub fn field(c: &TableColumn) -> Field {
    match c.ty {
        ColumnType::Json => Field::new(&c.name, DataType::Utf8, true).with_metadata(HashMap::from(
            [(MYSQL_TYPE.to_string(), "json".to_string())],
        )),
        ColumnType::BigInt | ColumnType::Int => Field::new(&c.name, DataType::Int64, true),
        ColumnType::Double => Field::new(&c.name, DataType::Float64, true),
        ColumnType::Blob => Field::new(&c.name, DataType::Binary, true),
        ColumnType::Text | ColumnType::Varchar(_) => Field::new(&c.name, DataType::Utf8, true),
    }
}

/// The Arrow schema of a table.
pub fn table_schema(columns: &[TableColumn]) -> SchemaRef {
    Arc::new(Schema::new(columns.iter().map(field).collect::<Vec<_>>()))
}

fn text(v: &Json) -> Option<String> {
    match v {
        Json::Null => None,
        Json::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Rows (JSON cells in `schema`'s column order) as one record batch.
pub fn rows_to_batch(schema: &SchemaRef, rows: &[Vec<Json>]) -> Result<RecordBatch, ArrowError> {
    let cell = |r: &Vec<Json>, i: usize| r.get(i).cloned().unwrap_or(Json::Null);
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (i, f) in schema.fields().iter().enumerate() {
        let col: ArrayRef = match f.data_type() {
            DataType::Int64 => Arc::new(
                rows.iter()
                    .map(|r| match cell(r, i) {
                        Json::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|d| d as i64)),
                        Json::String(s) => s.parse().ok(),
                        _ => None,
                    })
                    .collect::<Int64Array>(),
            ),
            DataType::Float64 => Arc::new(
                rows.iter()
                    .map(|r| match cell(r, i) {
                        Json::Number(n) => n.as_f64(),
                        Json::String(s) => s.parse().ok(),
                        _ => None,
                    })
                    .collect::<Float64Array>(),
            ),
            DataType::Binary => {
                let values: Vec<Option<Vec<u8>>> = rows
                    .iter()
                    .map(|r| {
                        text(&cell(r, i))
                            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                    })
                    .collect();
                Arc::new(values.iter().map(|v| v.as_deref()).collect::<BinaryArray>())
            }
            _ => Arc::new(
                rows.iter()
                    .map(|r| text(&cell(r, i)))
                    .collect::<StringArray>(),
            ),
        };
        cols.push(col);
    }
    RecordBatch::try_new_with_options(
        schema.clone(),
        cols,
        &RecordBatchOptions::new().with_row_count(Some(rows.len())),
    )
}

/// A batch of `rows` rows for a schema without columns (what `COUNT(*)` scans).
pub fn empty_rows(schema: &SchemaRef, rows: usize) -> Result<RecordBatch, ArrowError> {
    RecordBatch::try_new_with_options(
        schema.clone(),
        vec![],
        &RecordBatchOptions::new().with_row_count(Some(rows)),
    )
}

/// A batch as Arrow IPC stream bytes.
pub fn encode_ipc(batch: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
    let mut out = Vec::new();
    {
        let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut out, batch.schema_ref())?;
        w.write(batch)?;
        w.finish()?;
    }
    Ok(out)
}

/// Record batches from Arrow IPC stream bytes.
pub fn decode_ipc(bytes: &[u8]) -> Result<Vec<RecordBatch>, ArrowError> {
    arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?.collect()
}

/// The rows of a record batch as JSON cells, the inverse of [`rows_to_batch`]: numbers for
/// integer and double columns, base64 text for binary ones, text otherwise.
pub fn batch_to_rows(batch: &RecordBatch) -> Vec<Vec<Json>> {
    use arrow_array::{cast::AsArray, types::Float64Type, types::Int64Type, Array};
    let mut rows: Vec<Vec<Json>> = (0..batch.num_rows())
        .map(|_| Vec::with_capacity(batch.num_columns()))
        .collect();
    for col in batch.columns() {
        for (i, row) in rows.iter_mut().enumerate() {
            if col.is_null(i) {
                row.push(Json::Null);
                continue;
            }
            row.push(match col.data_type() {
                DataType::Int64 => Json::from(col.as_primitive::<Int64Type>().value(i)),
                DataType::Float64 => {
                    serde_json::Number::from_f64(col.as_primitive::<Float64Type>().value(i))
                        .map_or(Json::Null, Json::Number)
                }
                DataType::Binary => Json::String(
                    base64::engine::general_purpose::STANDARD
                        .encode(col.as_binary::<i32>().value(i)),
                ),
                DataType::Utf8 => Json::String(col.as_string::<i32>().value(i).to_string()),
                _ => Json::Null,
            });
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::tables::Table;

    #[test]
    fn rows_roundtrip_through_ipc_with_json_metadata() {
        let mut t = Table::kafka_connect_static("d", "t", 0);
        t.columns.push(TableColumn {
            name: "seq".into(),
            ty: ColumnType::BigInt,
            nullable: true,
            computed: Some("x".into()),
        });
        let schema = table_schema(&t.columns);
        let rows = vec![
            vec![
                Json::from("a"),
                Json::from("{}"),
                Json::from(r#"{"k":1}"#),
                Json::from(7),
            ],
            vec![
                Json::from("b"),
                Json::from("{}"),
                Json::from("{}"),
                Json::Null,
            ],
        ];
        let b = rows_to_batch(&schema, &rows).unwrap();
        let back = decode_ipc(&encode_ipc(&b).unwrap()).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0], b);
        assert_eq!(
            back[0]
                .schema()
                .field(1)
                .metadata()
                .get(MYSQL_TYPE)
                .map(String::as_str),
            Some("json")
        );
        // A projection of no columns still counts rows.
        let empty = Arc::new(schema.project(&[]).unwrap());
        let b = rows_to_batch(&empty, &rows).unwrap();
        assert_eq!(
            decode_ipc(&encode_ipc(&b).unwrap()).unwrap()[0].num_rows(),
            2
        );
    }
}
