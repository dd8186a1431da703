//! Writing one segment from rows (a flush's from the row segment, a merge's from segments):
//! in one pass that writes them and infers the JSON sub-columns (a second only when the first
//! rows' guess was wrong, [`write_segment`]); or, for a merge of segments that have
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

/// The sub-columns of each JSON column that has any (its position among the table's columns).
type SubColumns = Vec<(usize, Vec<json::SubColumn>)>;

/// Writes the rows `source` yields (each call a fresh pass, in row id order) as segment `id`
/// at `path`, with the JSON sub-columns inferred over all of its rows.
///
/// One pass in the common case: the sub-columns are guessed from the first batch of rows,
/// and the inference over every row is made while they are written; only if the later rows
/// change the picture (a path that stops being of one type, keys that come or go) is the
/// segment written again, with the sub-columns of all the rows (the second pass).
pub fn write_segment<I>(
    path: &Path,
    id: u64,
    columns: &[TableColumn],
    source: impl Fn() -> Result<I>,
) -> Result<SegmentMeta>
where
    I: Iterator<Item = Result<Row>>,
{
    let json_columns = json_columns(columns);
    let mut rows = source()?;
    let mut first = Vec::new();
    let mut bytes = 0usize;
    while first.len() < BATCH_ROWS && bytes < BATCH_BYTES {
        let Some(row) = rows.next() else { break };
        let row = row?;
        bytes += row_bytes(&row.1);
        first.push(row);
    }
    let mut guess = Inferred::new(&json_columns);
    for (k, at) in json_columns.iter().enumerate() {
        let values: Vec<Option<Json>> = first.iter().map(|(_, r)| json_value(r, *at)).collect();
        guess.add(k, &values);
    }
    let guess = guess.sub_columns(&json_columns, columns);
    let (meta, all) = write_with(
        path,
        id,
        columns,
        &guess,
        first.into_iter().map(Ok).chain(rows),
    )?;
    let same = guess.len() == all.len()
        && guess
            .iter()
            .zip(&all)
            .all(|((a, x), (b, y))| a == b && json::same_columns(x, y));
    if same {
        // The counts over every row.
        let json = all.into_iter().flat_map(|(_, s)| s).collect();
        return Ok(SegmentMeta { json, ..meta });
    }
    tracing::debug!(
        segment = id,
        "sub-columns of the whole segment differ from its first rows'; writing it again"
    );
    let (meta, _) = write_with(path, id, columns, &all, source()?)?;
    Ok(meta)
}

/// Writes `rows` with the sub-columns `subs`; also returns the sub-columns of these rows.
fn write_with(
    path: &Path,
    id: u64,
    columns: &[TableColumn],
    subs: &SubColumns,
    rows: impl Iterator<Item = Result<Row>>,
) -> Result<(SegmentMeta, SubColumns)> {
    let json_columns = json_columns(columns);
    let table = file::segment_schema(&common::arrow::table_schema(columns));
    let mut fields: Vec<_> = table.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.extend(
        subs.iter()
            .flat_map(|(_, s)| s.iter().map(json::SubColumn::field)),
    );
    let schema = Arc::new(Schema::new(fields));
    let (mut first, mut last) = (u64::MAX, 0u64);
    let mut inferred = Inferred::new(&json_columns);
    let batches = Batches {
        rows,
        subs,
        json_columns: &json_columns,
        inferred: &mut inferred,
        schema: schema.clone(),
        width: columns.len(),
        done: false,
        first: &mut first,
        last: &mut last,
    };
    let (rows, bytes, stats): (u64, u64, Vec<ColumnStats>) = file::write(path, &schema, batches)?;
    let meta = SegmentMeta {
        id,
        rows,
        bytes,
        first_row_id: first.min(last),
        last_row_id: last,
        columns: stats,
        json: subs.iter().flat_map(|(_, s)| s.clone()).collect(),
    };
    Ok((meta, inferred.sub_columns(&json_columns, columns)))
}

/// A row's value in the JSON column at `at`, parsed.
fn json_value(row: &[Json], at: usize) -> Option<Json> {
    json::parse(row.get(at).and_then(Json::as_str))
}

/// What a row's cells weigh in a batch.
fn row_bytes(values: &[Json]) -> usize {
    values.iter().map(|v| v.as_str().map_or(8, str::len)).sum()
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

/// The positions of the table's JSON columns that get sub-columns (stored, not computed).
fn json_columns(columns: &[TableColumn]) -> Vec<usize> {
    columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.ty == ColumnType::Json && c.computed.is_none())
        .map(|(i, _)| i)
        .collect()
}

/// The inference of each JSON column's sub-columns over rows.
struct Inferred(Vec<json::Inference>);

impl Inferred {
    fn new(json_columns: &[usize]) -> Self {
        Self(
            json_columns
                .iter()
                .map(|_| json::Inference::default())
                .collect(),
        )
    }

    /// Counts the values of the `k`-th JSON column over rows.
    fn add(&mut self, k: usize, values: &[Option<Json>]) {
        for v in values {
            self.0[k].add_value(v.as_ref());
        }
    }

    fn sub_columns(&self, json_columns: &[usize], columns: &[TableColumn]) -> SubColumns {
        json_columns
            .iter()
            .zip(&self.0)
            .map(|(at, inf)| (*at, inf.sub_columns(&columns[*at].name)))
            .filter(|(_, subs)| !subs.is_empty())
            .collect()
    }
}

/// Rows as record batches of a segment's schema.
struct Batches<'a, I> {
    rows: I,
    /// Per JSON column (its position): the sub-columns to fill.
    subs: &'a SubColumns,
    /// The positions of every JSON column, and the inference over the rows written so far.
    json_columns: &'a [usize],
    inferred: &'a mut Inferred,
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
        // Each JSON text parsed once, for the inference and for the sub-columns.
        for (k, at) in self.json_columns.iter().enumerate() {
            let values: Vec<Option<Json>> = rows.iter().map(|r| json_value(r, *at)).collect();
            self.inferred.add(k, &values);
            if let Some((_, subs)) = self.subs.iter().find(|(a, _)| a == at) {
                cols.extend(json::extract_values(subs, &values));
            }
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
                    bytes += row_bytes(&values);
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
