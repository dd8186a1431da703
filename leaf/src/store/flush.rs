//! Moving committed rows from the row segment (sled) into column segments, and reading a
//! table from both.
//!
//! A flush takes one partition's committed rows with ids in `(flushed_through, through]`,
//! where `through` is below every batch still prepared into the table (so every row in the
//! range is committed, and no batch is split), writes them as one segment, installs the new
//! manifest, and deletes the rows from the row segment once no reader that started before
//! can still want them there.

use super::rows::{row_key, Stored};
use super::segments::{self, file, json, Cleanup, ReadSnapshot, SegmentMeta};
use super::{corrupt, Result, Store, StoreError, TableRef, Visibility};
use common::catalog::tables::TableColumn;
use datafusion::arrow::array::{Int64Array, RecordBatch};
use datafusion::arrow::datatypes::SchemaRef;
use serde_json::Value as Json;
use std::sync::Arc;

/// Fault injection for the tests: `before-manifest` or `after-manifest` aborts the leaf at that
/// point of its next flush, as a crash would.
pub const CRASH_IN_FLUSH: &str = "SHARDLINE_TEST_CRASH_IN_FLUSH";

/// Rows per record batch a flush writes.
const FLUSH_BATCH_ROWS: usize = 8192;
const FLUSH_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// What one reader sees of a table: segments, and the row segment's visible rows above them.
pub struct TableSnapshot {
    pub segments: ReadSnapshot,
    visibility: Visibility,
}

impl TableSnapshot {
    /// Whether the row under `row_key` (partition + row id) is one of the snapshot's
    /// row-segment rows: visible, and above its partition's segments.
    pub fn tail_row(&self, row_key: &[u8]) -> bool {
        let Ok((partition, id)) = super::rows::parse_row_key(row_key) else {
            return false;
        };
        self.visibility.visible(row_key) && id > self.segments.flushed_through(partition)
    }
}

impl Store {
    /// Records the columns of a table the leaf loads into (what its flushes write); unchanged
    /// columns cost a map lookup.
    pub fn note_columns(&self, table: &TableRef, columns_json: &str) -> Result<()> {
        if columns_json.is_empty() {
            return Ok(());
        }
        let tree = table.tree();
        let mut known = self.columns_cache.lock().unwrap_or_else(|e| e.into_inner());
        if known.get(&tree).is_some_and(|c| c == columns_json) {
            return Ok(());
        }
        self.columns
            .insert(tree.as_bytes(), columns_json.as_bytes())?;
        known.insert(tree, columns_json.to_string());
        Ok(())
    }

    fn columns_of(&self, tree: &str) -> Result<Option<Vec<TableColumn>>> {
        match self.columns.get(tree.as_bytes())? {
            Some(json) => Ok(Some(serde_json::from_slice(&json).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    /// What a reader starting now sees of a table.
    pub fn table_snapshot(&self, table: &TableRef) -> TableSnapshot {
        // Segments first: a flush installed after this leaves its rows in the row segment
        // until this reader is done.
        let segments = self.segments.snapshot(&table.tree());
        TableSnapshot {
            segments,
            visibility: self.visibility(table),
        }
    }

    /// Calls `each` with the partition, row id and JSON of every row of the snapshot's row
    /// segment (rows above its segments), until it returns `false`.
    pub fn for_each_tail_row(
        &self,
        table: &TableRef,
        snapshot: &TableSnapshot,
        mut each: impl FnMut(&[u8]) -> Result<bool>,
    ) -> Result<()> {
        let Some(tree) = self.table(table)? else {
            return Ok(());
        };
        for item in tree.iter() {
            let (k, v) = item?;
            if !snapshot.visibility.visible(&k) {
                continue;
            }
            let stored = Stored::parse(&k, &v)?;
            if stored.first <= snapshot.segments.flushed_through(stored.partition) {
                continue; // in a segment; goes once older readers are done
            }
            for row in stored.rows() {
                if !each(row?.1)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// How many rows the snapshot's row segment holds.
    pub fn count_tail(&self, table: &TableRef, snapshot: &TableSnapshot) -> Result<usize> {
        let Some(tree) = self.table(table)? else {
            return Ok(0);
        };
        let mut n = 0;
        for item in tree.iter() {
            let (k, v) = item?;
            if !snapshot.visibility.visible(&k) {
                continue;
            }
            let stored = Stored::parse(&k, &v)?;
            if stored.first > snapshot.segments.flushed_through(stored.partition) {
                n += stored.count;
            }
        }
        Ok(n)
    }

    /// The highest row id of `tree` every row at or below which is committed: below every
    /// batch prepared into the table. `None` while a batch staged by an earlier version is
    /// pending (its rows' ids are not known until it finalizes).
    fn committed_through(&self, tree: &str) -> Result<Option<u64>> {
        for item in self.prepared.iter() {
            let (_, m) = item?;
            let marker: super::Marker = serde_json::from_slice(&m).map_err(corrupt)?;
            if marker.table_ref().tree() == tree && marker.ids.is_none() && marker.rows > 0 {
                return Ok(None);
            }
        }
        let pending = self.pending();
        let below_prepared = pending
            .ranges
            .get(tree)
            .and_then(|r| r.iter().map(|(_, first, _)| *first).min())
            .map(|first| first.saturating_sub(1));
        Ok(Some(
            below_prepared.map_or(pending.high, |b| b.min(pending.high)),
        ))
    }

    /// Flushes every partition whose row segment holds at least `min_rows` committed rows
    /// into a new segment, then deletes what no reader needs any more. Returns the segments
    /// written.
    pub fn flush_segments(&self, min_rows: usize) -> Result<usize> {
        let _flushing = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut written = 0;
        for name in self.db.tree_names() {
            let tree_name = String::from_utf8_lossy(&name).into_owned();
            if !tree_name.starts_with("table/") {
                continue;
            }
            let Some(columns) = self.columns_of(&tree_name)? else {
                continue;
            };
            let Some(through) = self.committed_through(&tree_name)? else {
                continue;
            };
            // Not beside the removal of a dropped table.
            let live = self.live.read().unwrap_or_else(|e| e.into_inner());
            if !self.db.tree_names().iter().any(|n| n == &name) {
                continue;
            }
            let tree = self.db.open_tree(&tree_name)?;
            for (partition, rows) in self.unflushed(&tree, &tree_name, through)? {
                if rows >= min_rows.max(1) {
                    self.flush_partition(&tree, &tree_name, partition, through, &columns)?;
                    written += 1;
                }
            }
            drop(live);
        }
        self.clean_up()?;
        Ok(written)
    }

    /// Rows per partition in the row segment above the partition's segments, up to `through`.
    fn unflushed(&self, tree: &sled::Tree, name: &str, through: u64) -> Result<Vec<(u32, usize)>> {
        let mut out = Vec::new();
        let mut next: Option<u32> = Some(0);
        while let Some(p) = next {
            let Some(first) = tree.range(row_key(p, 0)..).keys().next().transpose()? else {
                break;
            };
            let (partition, _) = super::rows::parse_row_key(&first)?;
            let ft = self.segments.manifest(name, partition).flushed_through;
            let mut n = 0;
            if ft < through {
                for item in tree.range(row_key(partition, ft + 1)..=row_key(partition, through)) {
                    let (k, v) = item?;
                    n += Stored::parse(&k, &v)?.count;
                }
            }
            if n > 0 {
                out.push((partition, n));
            }
            next = partition.checked_add(1);
        }
        Ok(out)
    }

    fn flush_partition(
        &self,
        tree: &sled::Tree,
        name: &str,
        partition: u32,
        through: u64,
        columns: &[TableColumn],
    ) -> Result<()> {
        let mut manifest = self.segments.manifest(name, partition);
        let from = manifest.flushed_through + 1;
        let compiled = common::expr::compile_table(columns).map_err(StoreError::Corrupt)?;
        let range = || tree.range(row_key(partition, from)..=row_key(partition, through));
        let subs = infer_sub_columns(range(), columns)?;
        let schema = file::segment_schema(&common::arrow::table_schema(columns));
        let schema = {
            let mut fields: Vec<_> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
            fields.extend(
                subs.iter()
                    .flat_map(|(_, s)| s.iter().map(json::SubColumn::field)),
            );
            Arc::new(datafusion::arrow::datatypes::Schema::new(fields))
        };
        let dir = self.segments.partition_dir(name, partition);
        std::fs::create_dir_all(&dir).map_err(|e| corrupt(format!("segment directory: {e}")))?;
        let meta_id = manifest.next_id;
        let path = dir.join(format!("seg-{meta_id}.parquet"));
        let (mut first_id, mut last_id) = (u64::MAX, 0u64);
        let batches = RowBatches {
            entries: range(),
            subs: &subs,
            schema: schema.clone(),
            columns,
            compiled: &compiled,
            pending: Vec::new(),
            ids: Vec::new(),
            bytes: 0,
            done: false,
            first_id: &mut first_id,
            last_id: &mut last_id,
        };
        let (rows, bytes, stats) = file::write(&path, &schema, batches)?;
        crash_point("before-manifest");
        manifest.segments.push(SegmentMeta {
            id: meta_id,
            rows,
            bytes,
            first_row_id: first_id.min(last_id),
            last_row_id: last_id,
            columns: stats,
            json: subs.into_iter().flat_map(|(_, s)| s).collect(),
        });
        manifest.flushed_through = through;
        manifest.next_id = meta_id + 1;
        self.segments.install(
            manifest,
            Cleanup {
                files: vec![],
                rows: Some((name.to_string(), partition, through)),
            },
        )?;
        crash_point("after-manifest");
        tracing::debug!(
            tree = name,
            partition,
            rows,
            bytes,
            "flushed a column segment"
        );
        self.metrics_flushed(rows, bytes);
        Ok(())
    }

    fn metrics_flushed(&self, rows: u64, bytes: u64) {
        if let Some(m) = &*self.metrics.lock().unwrap_or_else(|e| e.into_inner()) {
            m.add("shardline_leaf_segments_flushed_total", 1.0);
            m.add("shardline_leaf_segment_rows_flushed_total", rows as f64);
            m.add("shardline_leaf_segment_bytes_written_total", bytes as f64);
        }
    }

    /// Runs the cleanups no reader holds up: row-segment rows now in segments, replaced files.
    pub fn clean_up(&self) -> Result<()> {
        for c in self.segments.collect() {
            if let Some((tree, partition, through)) = &c.rows {
                self.delete_tail_rows(tree, *partition, *through)?;
            }
            for f in &c.files {
                if let Err(e) = std::fs::remove_file(f) {
                    tracing::warn!(file = %f.display(), "cannot remove a replaced segment: {e}");
                }
            }
        }
        Ok(())
    }

    /// Deletes a partition's row-segment rows with ids up to `through` (they are in segments).
    pub(super) fn delete_tail_rows(&self, tree: &str, partition: u32, through: u64) -> Result<()> {
        if !self.db.tree_names().iter().any(|n| n == tree.as_bytes()) {
            return Ok(());
        }
        let t = self.db.open_tree(tree)?;
        let mut batch = sled::Batch::default();
        for k in t
            .range(row_key(partition, 0)..=row_key(partition, through))
            .keys()
        {
            batch.remove(k?);
        }
        t.apply_batch(batch)?;
        Ok(())
    }

    /// Every segment of the table in `snapshot`, with its path.
    pub fn snapshot_segments(snapshot: &TableSnapshot) -> Vec<(std::path::PathBuf, SegmentMeta)> {
        let mut out: Vec<_> = snapshot
            .segments
            .partitions
            .values()
            .flat_map(|p| p.manifest.segments.iter().map(|s| (p.path(s), s.clone())))
            .collect();
        out.sort_by_key(|(_, s)| s.first_row_id);
        out
    }

    /// Every partition's manifest (for `information_schema.COLUMNAR_SEGMENTS`).
    pub fn manifests(&self) -> Vec<Arc<segments::PartitionSnapshot>> {
        self.segments.all()
    }
}

/// The sub-columns of each JSON column over a range of the row segment (a pass of its own: a
/// segment's schema is fixed before its first row is written).
fn infer_sub_columns(
    entries: sled::Iter,
    columns: &[TableColumn],
) -> Result<Vec<(usize, Vec<json::SubColumn>)>> {
    let json_columns: Vec<usize> = columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.ty == common::catalog::tables::ColumnType::Json && c.computed.is_none())
        .map(|(i, _)| i)
        .collect();
    if json_columns.is_empty() {
        return Ok(vec![]);
    }
    let mut inference: Vec<json::Inference> = json_columns
        .iter()
        .map(|_| json::Inference::default())
        .collect();
    for item in entries {
        let (k, v) = item?;
        for row in Stored::parse(&k, &v)?.rows() {
            let values: Vec<Json> = serde_json::from_slice(row?.1).map_err(corrupt)?;
            for (at, inf) in json_columns.iter().zip(inference.iter_mut()) {
                inf.add(values.get(*at).and_then(Json::as_str));
            }
        }
    }
    Ok(json_columns
        .iter()
        .zip(inference)
        .map(|(at, inf)| (*at, inf.sub_columns(&columns[*at].name)))
        .filter(|(_, subs)| !subs.is_empty())
        .collect())
}

fn crash_point(at: &str) {
    if std::env::var(CRASH_IN_FLUSH).is_ok_and(|v| v == at) {
        tracing::warn!("{CRASH_IN_FLUSH}={at}: aborting the leaf mid-flush");
        std::process::abort();
    }
}

/// The committed rows of a range of the row segment as record batches of a segment's schema.
struct RowBatches<'a> {
    entries: sled::Iter,
    /// Per JSON column (its position): the sub-columns to fill.
    subs: &'a [(usize, Vec<json::SubColumn>)],
    schema: SchemaRef,
    columns: &'a [TableColumn],
    compiled: &'a [Option<common::expr::Expr>],
    pending: Vec<Vec<Json>>,
    ids: Vec<i64>,
    bytes: usize,
    done: bool,
    first_id: &'a mut u64,
    last_id: &'a mut u64,
}

impl RowBatches<'_> {
    fn fill(&mut self) -> Result<()> {
        while self.pending.len() < FLUSH_BATCH_ROWS && self.bytes < FLUSH_BATCH_BYTES {
            let Some(item) = self.entries.next() else {
                self.done = true;
                return Ok(());
            };
            let (k, v) = item?;
            let stored = Stored::parse(&k, &v)?;
            for (i, row) in (0..stored.count).zip(stored.rows()) {
                let (_, row) = row?;
                let mut values: Vec<Json> = serde_json::from_slice(row).map_err(corrupt)?;
                if values.len() < self.columns.len() {
                    common::expr::complete_row(&mut values, self.columns, self.compiled);
                }
                values.truncate(self.columns.len());
                let id = stored.first + i as u64;
                *self.first_id = (*self.first_id).min(id);
                *self.last_id = (*self.last_id).max(id);
                self.ids.push(id as i64);
                self.bytes += row.len();
                self.pending.push(values);
            }
        }
        Ok(())
    }

    fn take(&mut self) -> Result<RecordBatch> {
        let rows = std::mem::take(&mut self.pending);
        let ids = std::mem::take(&mut self.ids);
        self.bytes = 0;
        let table = Arc::new(
            self.schema
                .project(&(0..self.columns.len()).collect::<Vec<_>>())
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

impl Iterator for RowBatches<'_> {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done && self.pending.is_empty() {
            return None;
        }
        if let Err(e) = self.fill() {
            self.done = true;
            self.pending.clear();
            return Some(Err(e));
        }
        if self.pending.is_empty() {
            return None;
        }
        Some(self.take())
    }
}
