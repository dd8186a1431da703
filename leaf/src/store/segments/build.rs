//! Writing one segment from rows (a flush's from the row segment, a merge's from segments):
//! one pass to infer the JSON sub-columns, one to write; or, for a merge of segments that have
//! the same columns, from their record batches as they are ([`concat_segments`]).

use super::{file, json, ColumnStats, SegmentMeta};
use crate::store::{corrupt, Result};
use common::catalog::tables::{ColumnType, TableColumn};
use datafusion::arrow::array::{Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Rows per record batch a segment is written in.
const BATCH_ROWS: usize = 8192;
const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// A row on its way into a segment: its id and its cells (every column of the table).
pub type Row = (u64, Vec<Json>);

/// Writes the rows `source` yields (each call a fresh pass, in row id order) as segment `id`
/// at `path`.
pub fn write_segment<I>(
    path: &Path,
    id: u64,
    columns: &[TableColumn],
    source: impl Fn() -> Result<I>,
) -> Result<SegmentMeta>
where
    I: Iterator<Item = Result<Row>>,
{
    let subs = infer(source()?, columns)?;
    let table = file::segment_schema(&common::arrow::table_schema(columns));
    let mut fields: Vec<_> = table.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.extend(
        subs.iter()
            .flat_map(|(_, s)| s.iter().map(json::SubColumn::field)),
    );
    let schema = Arc::new(Schema::new(fields));
    let (mut first, mut last) = (u64::MAX, 0u64);
    let batches = Batches {
        rows: source()?,
        subs: &subs,
        schema: schema.clone(),
        width: columns.len(),
        done: false,
        first: &mut first,
        last: &mut last,
    };
    let (rows, bytes, stats): (u64, u64, Vec<ColumnStats>) = file::write(path, &schema, batches)?;
    Ok(SegmentMeta {
        id,
        rows,
        bytes,
        first_row_id: first.min(last),
        last_row_id: last,
        columns: stats,
        json: subs.into_iter().flat_map(|(_, s)| s).collect(),
    })
}

/// Writes segments that share one schema holding every column of the table (the same JSON
/// sub-columns, no column added since) as segment `id` at `path`, their record batches copied
/// as they are: no row is turned back into JSON values, no JSON text parsed again. `None`
/// (nothing written) when their schemas differ: the merge then goes row by row
/// ([`write_segment`]) and infers the sub-columns of the merged rows.
pub fn concat_segments(
    path: &Path,
    id: u64,
    columns: &[TableColumn],
    inputs: &[(PathBuf, SegmentMeta)],
) -> Result<Option<SegmentMeta>> {
    let Some((first_path, first_meta)) = inputs.first() else {
        return Ok(None);
    };
    let schema = file::Segment::open(first_path)?.schema().clone();
    let table = file::segment_schema(&common::arrow::table_schema(columns));
    let same_fields = |a: &SchemaRef| {
        a.fields().len() == schema.fields().len()
            && a.fields()
                .iter()
                .zip(schema.fields())
                .all(|(x, y)| x.name() == y.name() && x.data_type() == y.data_type())
    };
    let has_table = table.fields().iter().all(|f| {
        schema
            .field_with_name(f.name())
            .is_ok_and(|s| s.data_type() == f.data_type())
    });
    if !has_table
        || inputs
            .iter()
            .any(|(_, m)| m.json.len() != first_meta.json.len())
    {
        return Ok(None);
    }
    let mut segments = Vec::with_capacity(inputs.len());
    for (p, _) in inputs {
        let segment = file::Segment::open(p)?;
        if !same_fields(segment.schema()) {
            return Ok(None);
        }
        segments.push(segment);
    }
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let batches = segments.into_iter().flat_map(|segment| {
        let groups = segment.row_groups(None);
        let reader = match segment.read(&names, groups, BATCH_BYTES, BATCH_ROWS, None) {
            Ok(r) => r,
            Err(e) => return Box::new(std::iter::once(Err(e))) as Box<dyn Iterator<Item = _>>,
        };
        Box::new(reader.map(|b| b.map_err(corrupt)))
    });
    let (rows, bytes, stats) = file::write(path, &schema, batches)?;
    let mut json = first_meta.json.clone();
    for sub in &mut json {
        sub.present = inputs
            .iter()
            .flat_map(|(_, m)| &m.json)
            .filter(|s| s.source == sub.source && s.path == sub.path && s.ty == sub.ty)
            .map(|s| s.present)
            .sum();
    }
    Ok(Some(SegmentMeta {
        id,
        rows,
        bytes,
        first_row_id: inputs
            .iter()
            .map(|(_, m)| m.first_row_id)
            .min()
            .unwrap_or(0),
        last_row_id: inputs.iter().map(|(_, m)| m.last_row_id).max().unwrap_or(0),
        columns: stats,
        json,
    }))
}

/// The sub-columns of each JSON column over the rows.
fn infer(
    rows: impl Iterator<Item = Result<Row>>,
    columns: &[TableColumn],
) -> Result<Vec<(usize, Vec<json::SubColumn>)>> {
    let json_columns: Vec<usize> = columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.ty == ColumnType::Json && c.computed.is_none())
        .map(|(i, _)| i)
        .collect();
    if json_columns.is_empty() {
        return Ok(vec![]);
    }
    let mut inference: Vec<json::Inference> = json_columns
        .iter()
        .map(|_| json::Inference::default())
        .collect();
    for row in rows {
        let (_, values) = row?;
        for (at, inf) in json_columns.iter().zip(inference.iter_mut()) {
            inf.add(values.get(*at).and_then(Json::as_str));
        }
    }
    Ok(json_columns
        .iter()
        .zip(inference)
        .map(|(at, inf)| (*at, inf.sub_columns(&columns[*at].name)))
        .filter(|(_, subs)| !subs.is_empty())
        .collect())
}

/// Rows as record batches of a segment's schema.
struct Batches<'a, I> {
    rows: I,
    /// Per JSON column (its position): the sub-columns to fill.
    subs: &'a [(usize, Vec<json::SubColumn>)],
    schema: SchemaRef,
    width: usize,
    done: bool,
    first: &'a mut u64,
    last: &'a mut u64,
}

impl<I: Iterator<Item = Result<Row>>> Batches<'_, I> {
    fn batch(&mut self, rows: Vec<Vec<Json>>, ids: Vec<i64>) -> Result<RecordBatch> {
        let table = Arc::new(
            self.schema
                .project(&(0..self.width).collect::<Vec<_>>())
                .map_err(corrupt)?,
        );
        let b = common::arrow::rows_to_batch(&table, &rows).map_err(corrupt)?;
        let mut cols = b.columns().to_vec();
        cols.push(Arc::new(Int64Array::from(ids)));
        for (at, subs) in self.subs {
            let texts: Vec<Option<&str>> = rows
                .iter()
                .map(|r| r.get(*at).and_then(Json::as_str))
                .collect();
            cols.extend(json::extract(subs, &texts));
        }
        RecordBatch::try_new(self.schema.clone(), cols).map_err(corrupt)
    }
}

impl<I: Iterator<Item = Result<Row>>> Iterator for Batches<'_, I> {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let (mut rows, mut ids, mut bytes) = (Vec::new(), Vec::new(), 0usize);
        while rows.len() < BATCH_ROWS && bytes < BATCH_BYTES {
            match self.rows.next() {
                None => {
                    self.done = true;
                    break;
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Some(Ok((id, mut values))) => {
                    values.truncate(self.width);
                    bytes += values
                        .iter()
                        .map(|v| v.as_str().map_or(8, str::len))
                        .sum::<usize>();
                    *self.first = (*self.first).min(id);
                    *self.last = (*self.last).max(id);
                    ids.push(id as i64);
                    rows.push(values);
                }
            }
        }
        if rows.is_empty() {
            return None;
        }
        Some(self.batch(rows, ids))
    }
}
