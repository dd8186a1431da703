//! One segment file: Parquet (arrow-rs), zstd-compressed, with min/max statistics per row
//! group and page, the table's columns plus [`ROW_ID`].

use super::{ColumnStats, Result};
use crate::store::StoreError;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef};
use datafusion::arrow::error::ArrowError;
use datafusion::common::pruning::PruningStatistics;
use datafusion::common::{Column, ScalarValue};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::pruning::PruningPredicate;
use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
use parquet::arrow::arrow_reader::{
    ArrowPredicate, ArrowPredicateFn, ArrowReaderMetadata, ArrowReaderOptions,
    ParquetRecordBatchReaderBuilder, RowFilter,
};
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::ParquetMetaData;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

/// The column holding each row's id in the store (ids grow with commit order); a reserved
/// name (MySQL identifiers cannot hold NUL), so no table column has it.
pub const ROW_ID: &str = "\0row_id";

/// A row group ends once its encoded data reaches this size (the writer holds one row group
/// in memory), or at [`ROW_GROUP_ROWS`] rows.
const ROW_GROUP_BYTES: usize = 16 * 1024 * 1024;
const ROW_GROUP_ROWS: usize = 128 * 1024;
/// Longest string kept as a column's min/max in the manifest.
const STAT_CHARS: usize = 64;

fn parquet_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("segment file: {e}"))
}

/// The schema of a table's segments: its columns, then [`ROW_ID`].
pub fn segment_schema(table: &SchemaRef) -> SchemaRef {
    let mut fields: Vec<Field> = table.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(ROW_ID, DataType::Int64, false));
    Arc::new(Schema::new_with_metadata(fields, table.metadata().clone()))
}

/// How a segment's columns are encoded. The table's text and binary columns (the JSON text
/// above all) are zstd-compressed: they are most of the bytes. Numbers and sub-columns are
/// small and read by small queries, so they use LZ4 (parquet's zstd codec allocates a
/// compression and a decompression context, some hundred KiB zeroed, for every column chunk
/// it reads: a point filter over a few segments spent a fifth of its time there), integers
/// delta-encoded where a dictionary does not pay.
fn writer_properties(schema: &SchemaRef) -> Result<WriterProperties> {
    let zstd = Compression::ZSTD(ZstdLevel::try_new(1).map_err(parquet_error)?);
    let mut props = WriterProperties::builder()
        .set_compression(Compression::LZ4_RAW)
        .set_dictionary_page_size_limit(DICTIONARY_BYTES)
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS));
    for f in schema.fields() {
        let path = ColumnPath::from(f.name().as_str());
        let sub_column = super::json::SubColumn::of_field(f).is_some();
        match f.data_type() {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Binary if !sub_column => {
                props = props.set_column_compression(path, zstd);
            }
            DataType::Int64 => {
                props = props.set_column_encoding(path, Encoding::DELTA_BINARY_PACKED);
            }
            _ => {}
        }
    }
    Ok(props.build())
}

/// A column's dictionary is dropped (for its plain or delta encoding) once it reaches this
/// size: unique values (ids, JSON text) gain nothing from one.
const DICTIONARY_BYTES: usize = 64 * 1024;

/// Writes a segment to `path` (via a temporary file, synced and renamed): the batches, which
/// have [`segment_schema`]'s columns. Returns the rows, the file's size and per-column stats.
pub fn write(
    path: &Path,
    schema: &SchemaRef,
    batches: impl IntoIterator<Item = Result<RecordBatch>>,
) -> Result<(u64, u64, Vec<ColumnStats>)> {
    let tmp = path.with_extension("tmp");
    let file = std::fs::File::create(&tmp).map_err(parquet_error)?;
    let props = writer_properties(schema)?;
    let mut w = ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(parquet_error)?;
    let mut stats: Vec<ColumnStats> = schema
        .fields()
        .iter()
        .map(|f| ColumnStats {
            name: f.name().clone(),
            ..Default::default()
        })
        .collect();
    let mut rows = 0u64;
    for b in batches {
        let b = b?;
        rows += b.num_rows() as u64;
        for (s, col) in stats.iter_mut().zip(b.columns()) {
            merge_stats(s, col);
        }
        w.write(&b).map_err(parquet_error)?;
        if w.in_progress_size() >= ROW_GROUP_BYTES {
            w.flush().map_err(parquet_error)?;
        }
    }
    let file = w.into_inner().map_err(parquet_error)?;
    file.sync_all().map_err(parquet_error)?;
    let bytes = file.metadata().map_err(parquet_error)?.len();
    drop(file);
    std::fs::rename(&tmp, path).map_err(parquet_error)?;
    super::sync_dir(path)?;
    Ok((rows, bytes, stats))
}

fn json_of(v: ScalarValue) -> Option<serde_json::Value> {
    match v {
        ScalarValue::Int64(Some(i)) => Some(i.into()),
        ScalarValue::Float64(Some(f)) => serde_json::Number::from_f64(f).map(Into::into),
        ScalarValue::Utf8(Some(s)) => Some(s.chars().take(STAT_CHARS).collect::<String>().into()),
        _ => None,
    }
}

fn merge_stats(s: &mut ColumnStats, col: &ArrayRef) {
    use datafusion::arrow::compute;
    s.nulls += col.null_count() as u64;
    let (min, max) = match col.data_type() {
        DataType::Int64 => {
            let a = col.as_primitive::<Int64Type>();
            (
                ScalarValue::Int64(compute::min(a)),
                ScalarValue::Int64(compute::max(a)),
            )
        }
        DataType::Float64 => {
            let a = col.as_primitive::<Float64Type>();
            (
                ScalarValue::Float64(compute::min(a)),
                ScalarValue::Float64(compute::max(a)),
            )
        }
        DataType::Utf8 => {
            let a = col.as_string::<i32>();
            (
                ScalarValue::Utf8(compute::min_string(a).map(str::to_owned)),
                ScalarValue::Utf8(compute::max_string(a).map(str::to_owned)),
            )
        }
        _ => return,
    };
    let pick = |old: &mut Option<serde_json::Value>, new: Option<serde_json::Value>, less: bool| {
        let Some(new) = new else { return };
        let replace = match (old.as_ref(), &new) {
            (None, _) => true,
            (Some(serde_json::Value::Number(a)), serde_json::Value::Number(b)) => {
                let (a, b) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
                if less {
                    b < a
                } else {
                    b > a
                }
            }
            (Some(serde_json::Value::String(a)), serde_json::Value::String(b)) => {
                if less {
                    b < a
                } else {
                    b > a
                }
            }
            _ => false,
        };
        if replace {
            *old = Some(new);
        }
    };
    pick(&mut s.min, json_of(min), true);
    pick(&mut s.max, json_of(max), false);
}

/// An open segment: its metadata, for pruning and projection.
pub struct Segment {
    builder: ParquetRecordBatchReaderBuilder<std::fs::File>,
}

/// Most segment footers kept parsed ([`Segment::open`]).
const FOOTERS: usize = 4096;

/// A file's identity for the footer cache: a path may name another file later (a table
/// dropped and created again), never with the same size and modification time.
type FileKey = (std::path::PathBuf, u64, Option<std::time::SystemTime>);

fn footers() -> &'static std::sync::Mutex<HashMap<FileKey, ArrowReaderMetadata>> {
    static FOOTERS: std::sync::OnceLock<std::sync::Mutex<HashMap<FileKey, ArrowReaderMetadata>>> =
        std::sync::OnceLock::new();
    FOOTERS.get_or_init(Default::default)
}

impl Segment {
    /// Opens a segment file; its footer (schema, row groups, statistics) is parsed once and
    /// kept, since a file never changes once written: a small query's scans then cost a
    /// file open, not a footer parse per segment.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(parquet_error)?;
        let stat = file.metadata().map_err(parquet_error)?;
        let key = (path.to_path_buf(), stat.len(), stat.modified().ok());
        let cached = footers()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let meta = match cached {
            Some(m) => m,
            None => {
                let m = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
                    .map_err(parquet_error)?;
                let mut all = footers().lock().unwrap_or_else(|p| p.into_inner());
                if all.len() >= FOOTERS {
                    all.clear();
                }
                all.insert(key, m.clone());
                m
            }
        };
        Ok(Self {
            builder: ParquetRecordBatchReaderBuilder::new_with_metadata(file, meta),
        })
    }

    pub fn schema(&self) -> &SchemaRef {
        self.builder.schema()
    }

    fn metadata(&self) -> &Arc<ParquetMetaData> {
        self.builder.metadata()
    }

    /// The row groups that may hold rows `predicate` (over `schema`, whose columns are found
    /// here by name) keeps: by each row group's min/max and null counts.
    pub fn row_groups(&self, predicate: Option<&PruningPredicate>) -> Vec<usize> {
        let all: Vec<usize> = (0..self.metadata().num_row_groups()).collect();
        let Some(p) = predicate else {
            return all;
        };
        match p.prune(&RowGroupStats { segment: self }) {
            Ok(keep) => all.into_iter().filter(|i| keep[*i]).collect(),
            Err(_) => all,
        }
    }

    /// Reads `columns` (names present in the file) of `row_groups`, in batches of about
    /// `batch_bytes`; with `filter` (over this file's columns, by index), only the rows it
    /// keeps, the other columns decoded only for those rows.
    pub fn read(
        self,
        columns: &[&str],
        row_groups: Vec<usize>,
        batch_bytes: usize,
        max_rows: usize,
        filter: Option<Arc<dyn PhysicalExpr>>,
    ) -> Result<Batches> {
        let schema = self.builder.schema().clone();
        let wanted: HashSet<&str> = columns.iter().copied().collect();
        let indices: Vec<usize> = schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| wanted.contains(f.name().as_str()))
            .map(|(i, _)| i)
            .collect();
        // Rows per batch from the projected columns' average row size.
        let meta = self.metadata().clone();
        let (mut bytes, mut rows) = (0i64, 0i64);
        for rg in row_groups.iter().filter_map(|i| meta.row_groups().get(*i)) {
            rows += rg.num_rows();
            for i in &indices {
                bytes += rg.column(*i).uncompressed_size();
            }
        }
        let per_row = if rows > 0 {
            (bytes / rows).max(1) as usize
        } else {
            1
        };
        let batch_rows = (batch_bytes / per_row).clamp(1, max_rows);
        let mask = ProjectionMask::roots(self.builder.parquet_schema(), indices.clone());
        let mut builder = self.builder;
        let mut after = None;
        if let Some(filter) = filter {
            let (read, filter) = over_own_columns(filter);
            if read == indices {
                // The filter reads every column the scan returns: a row filter would decode
                // them twice (once to filter, once for the rows kept); filter the batches.
                after = Some(filter);
            } else {
                let predicate = row_predicate(read, filter, builder.parquet_schema());
                builder = builder.with_row_filter(RowFilter::new(vec![Box::new(predicate)]));
            }
        }
        let reader = builder
            .with_projection(mask)
            .with_row_groups(row_groups)
            .with_batch_size(batch_rows)
            .build()
            .map_err(parquet_error)?;
        Ok(match after {
            None => Box::new(reader),
            Some(filter) => Box::new(reader.filter_map(move |b| {
                let filtered = b.and_then(|b| {
                    let kept = kept_rows(filter.as_ref(), &b)?;
                    datafusion::arrow::compute::filter_record_batch(&b, &kept)
                });
                match filtered {
                    Ok(b) if b.num_rows() == 0 => None,
                    other => Some(other),
                }
            })),
        })
    }
}

/// The record batches a segment read returns.
pub type Batches = Box<dyn Iterator<Item = std::result::Result<RecordBatch, ArrowError>> + Send>;

/// The file columns `filter` reads (in file order), and `filter` over a batch of just those
/// columns.
fn over_own_columns(filter: Arc<dyn PhysicalExpr>) -> (Vec<usize>, Arc<dyn PhysicalExpr>) {
    use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
    use datafusion::physical_expr::expressions::Column as ColumnExpr;
    let mut read: Vec<usize> = datafusion::physical_expr::utils::collect_columns(&filter)
        .iter()
        .map(ColumnExpr::index)
        .collect();
    read.sort_unstable();
    read.dedup();
    let filter = filter
        .transform(|e| {
            let Some(c) = e.downcast_ref::<ColumnExpr>() else {
                return Ok(Transformed::no(e));
            };
            let i = read.iter().position(|i| *i == c.index()).unwrap_or(0);
            Ok(Transformed::yes(Arc::new(ColumnExpr::new(c.name(), i)) as _))
        })
        .data()
        .unwrap_or_else(|_| datafusion::physical_expr::expressions::lit(true));
    (read, filter)
}

/// The rows of `batch` that `filter` keeps; rows it leaves NULL are dropped like rows it
/// rejects.
fn kept_rows(
    filter: &dyn PhysicalExpr,
    batch: &RecordBatch,
) -> std::result::Result<datafusion::arrow::array::BooleanArray, ArrowError> {
    let n = batch.num_rows();
    let kept = filter
        .evaluate(batch)
        .and_then(|v| v.into_array(n))
        .map_err(|e| ArrowError::ComputeError(e.to_string()))?;
    let kept = kept
        .as_boolean_opt()
        .ok_or_else(|| ArrowError::ComputeError("the filter is not boolean".into()))?;
    Ok(match kept.nulls() {
        Some(_) => datafusion::arrow::compute::prep_null_mask_filter(kept),
        None => kept.clone(),
    })
}

/// `filter` (over the file columns `read`, in file order) as a parquet row predicate: it
/// decodes just those columns.
fn row_predicate(
    read: Vec<usize>,
    filter: Arc<dyn PhysicalExpr>,
    parquet_schema: &parquet::schema::types::SchemaDescriptor,
) -> impl ArrowPredicate {
    let mask = ProjectionMask::roots(parquet_schema, read);
    ArrowPredicateFn::new(mask, move |batch| kept_rows(filter.as_ref(), &batch))
}

/// How many row groups a segment has.
pub fn segment_groups(segment: &Segment) -> usize {
    segment.metadata().num_row_groups()
}

/// A segment's row groups as DataFusion's pruning containers.
struct RowGroupStats<'a> {
    segment: &'a Segment,
}

impl RowGroupStats<'_> {
    fn converter(&self, column: &Column) -> Option<StatisticsConverter<'_>> {
        StatisticsConverter::try_new(
            &column.name,
            self.segment.schema(),
            self.segment.builder.parquet_schema(),
        )
        .ok()
    }
}

impl PruningStatistics for RowGroupStats<'_> {
    fn min_values(&self, column: &Column) -> Option<ArrayRef> {
        self.converter(column)?
            .row_group_mins(self.segment.metadata().row_groups().iter())
            .ok()
    }

    fn max_values(&self, column: &Column) -> Option<ArrayRef> {
        self.converter(column)?
            .row_group_maxes(self.segment.metadata().row_groups().iter())
            .ok()
    }

    fn num_containers(&self) -> usize {
        self.segment.metadata().num_row_groups()
    }

    fn null_counts(&self, column: &Column) -> Option<ArrayRef> {
        let c = self
            .converter(column)?
            .row_group_null_counts(self.segment.metadata().row_groups().iter())
            .ok()?;
        Some(Arc::new(c))
    }

    fn row_counts(&self) -> Option<ArrayRef> {
        let counts: datafusion::arrow::array::UInt64Array = self
            .segment
            .metadata()
            .row_groups()
            .iter()
            .map(|rg| Some(rg.num_rows() as u64))
            .collect();
        Some(Arc::new(counts))
    }

    fn contained(
        &self,
        _column: &Column,
        _values: &HashSet<ScalarValue>,
    ) -> Option<datafusion::arrow::array::BooleanArray> {
        None
    }
}
