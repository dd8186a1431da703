//! Moving committed rows from the row segment (sled) into column segments, and reading a
//! table from both.
//!
//! A flush takes one partition's committed rows with ids in `(flushed_through, through]`,
//! where `through` is below every batch still prepared into the table (so every row in the
//! range is committed, and no batch is split), writes them as one segment, installs the new
//! manifest, and deletes the rows from the row segment once no reader that started before
//! can still want them there.

use super::rows::{row_key, Stored};
use super::segments::{self, build, file, Cleanup, ReadSnapshot, SegmentMeta};
use super::{corrupt, Result, Store, StoreError, TableRef, Visibility};
use common::catalog::tables::TableColumn;
use datafusion::arrow::array::Int64Array;
use serde_json::Value as Json;
use std::sync::Arc;

/// Fault injection for the tests: `before-manifest` or `after-manifest` aborts the leaf at that
/// point of its next flush, as a crash would.
pub const CRASH_IN_FLUSH: &str = "SHARDLINE_TEST_CRASH_IN_FLUSH";

/// A partition whose row segment has not grown for this long is flushed whatever it holds,
/// so small and quiet tables are read from column segments too.
const IDLE_FLUSH: std::time::Duration = std::time::Duration::from_secs(10);

/// A partition's small segments merge once it has this many...
const MERGE_AT: usize = 8;
/// ... up to this many at a time ...
const MERGE_MOST: usize = 16;
/// ... where small is fewer rows than this.
const MERGED_ROWS: u64 = 1 << 20;

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
        self.visibility.visible(row_key) && !self.segments.in_segments(partition, id)
    }
}

impl Store {
    /// Records the columns of a table the leaf loads into (what its flushes write); unchanged
    /// columns cost a map lookup.
    pub fn note_columns(&self, table: &TableRef, columns: &[TableColumn]) -> Result<()> {
        if columns.is_empty() {
            return Ok(());
        }
        let columns_json = serde_json::to_string(columns).map_err(corrupt)?;
        let columns_json = columns_json.as_str();
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

    /// Calls `each` with every entry of the snapshot's row segment (rows above its segments;
    /// a row group holds rows of one batch: they are visible together), until it returns
    /// `false`.
    fn each_tail_entry(
        &self,
        table: &TableRef,
        snapshot: &TableSnapshot,
        mut each: impl FnMut(Stored<'_>) -> Result<bool>,
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
            // At or below flushed_through: in a segment; goes once older readers are done.
            if !snapshot
                .segments
                .in_segments(stored.partition, stored.first)
                && !each(stored)?
            {
                break;
            }
        }
        Ok(())
    }

    /// Calls `each` with the JSON of every row of the snapshot's row segment, until it returns
    /// `false`.
    pub fn for_each_tail_row(
        &self,
        table: &TableRef,
        snapshot: &TableSnapshot,
        mut each: impl FnMut(&[u8]) -> Result<bool>,
    ) -> Result<()> {
        self.each_tail_entry(table, snapshot, |stored| {
            for row in stored.rows() {
                if !each(row?.1)? {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    /// How many rows the snapshot's row segment holds.
    pub fn count_tail(&self, table: &TableRef, snapshot: &TableSnapshot) -> Result<usize> {
        let mut n = 0;
        self.each_tail_entry(table, snapshot, |stored| {
            n += stored.count;
            Ok(true)
        })?;
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
    /// into a new segment, merges small segments, then deletes what no reader needs any more.
    /// A table that fails is logged and left for the next round; the others go on. Returns
    /// the segments written.
    pub fn flush_segments(&self, min_rows: usize) -> Result<usize> {
        // Held by the removal of dropped tables too: a tree is not dropped under a flush.
        let _flushing = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut written = 0;
        let mut failed = None;
        for name in self.db.tree_names() {
            let tree_name = String::from_utf8_lossy(&name).into_owned();
            if !tree_name.starts_with("table/") {
                continue;
            }
            match self.flush_table(&tree_name, min_rows) {
                Ok(n) => written += n,
                Err(e) => {
                    tracing::warn!(tree = tree_name, "flushing column segments failed: {e}");
                    failed = Some(e);
                }
            }
        }
        self.clean_up()?;
        match failed {
            Some(e) if written == 0 => Err(e),
            _ => Ok(written),
        }
    }

    fn flush_table(&self, tree_name: &str, min_rows: usize) -> Result<usize> {
        let Some(columns) = self.columns_of(tree_name)? else {
            return Ok(0);
        };
        let Some(through) = self.committed_through(tree_name)? else {
            return Ok(0);
        };
        let tree = self.db.open_tree(tree_name)?;
        let mut written = 0;
        for (partition, rows) in self.unflushed(&tree, tree_name, through)? {
            if rows >= min_rows.max(1) || self.idle_for(tree_name, partition, rows) >= IDLE_FLUSH {
                self.flush_partition(&tree, tree_name, partition, through, &columns)?;
                self.idle_for(tree_name, partition, 0);
                written += 1;
            }
        }
        for part in self.segments.all() {
            if part.manifest.tree == tree_name {
                self.merge_partition(tree_name, part.manifest.partition, &columns)?;
            }
        }
        Ok(written)
    }

    /// How long a partition's unflushed row count has been `rows` (zero when it just changed).
    fn idle_for(&self, tree: &str, partition: u32, rows: usize) -> std::time::Duration {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let seen = idle
            .entry((tree.to_string(), partition))
            .or_insert((rows, now));
        if seen.0 != rows {
            *seen = (rows, now);
        }
        now - seen.1
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
            let from = first_unflushed(&self.segments.manifest(name, partition));
            let mut n = 0;
            if from <= through {
                for item in tree.range(row_key(partition, from)..=row_key(partition, through)) {
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
        let from = first_unflushed(&manifest);
        let compiled = common::expr::compile_table(columns).map_err(StoreError::Corrupt)?;
        let dir = self.segments.partition_dir(name, partition);
        std::fs::create_dir_all(&dir).map_err(|e| corrupt(format!("segment directory: {e}")))?;
        let (id, path) = fresh_segment(&dir, manifest.next_id);
        let source = || -> Result<_> {
            Ok(tail_rows(
                tree.range(row_key(partition, from)..=row_key(partition, through)),
                columns,
                &compiled,
            ))
        };
        let segment = build::write_segment(&path, id, columns, source)?;
        crash_point("before-manifest");
        let (rows, bytes) = (segment.rows, segment.bytes);
        manifest.segments.push(segment);
        manifest.flushed_through = Some(through);
        manifest.next_id = id + 1;
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

    /// Merges a partition's small segments into one once it has [`MERGE_AT`] of them (up to
    /// [`MERGE_MOST`] at a time, oldest first); segments written before a column was added
    /// get it on the way. Returns whether it merged.
    fn merge_partition(&self, name: &str, partition: u32, columns: &[TableColumn]) -> Result<bool> {
        let mut manifest = self.segments.manifest(name, partition);
        let small: Vec<SegmentMeta> = manifest
            .segments
            .iter()
            .filter(|s| s.rows < MERGED_ROWS)
            .take(MERGE_MOST)
            .cloned()
            .collect();
        if small.len() < MERGE_AT {
            return Ok(false);
        }
        let compiled = common::expr::compile_table(columns).map_err(StoreError::Corrupt)?;
        let dir = self.segments.partition_dir(name, partition);
        let (id, path) = fresh_segment(&dir, manifest.next_id);
        let inputs: Vec<std::path::PathBuf> =
            small.iter().map(|s| dir.join(s.file_name())).collect();
        let with_metas: Vec<_> = inputs.iter().cloned().zip(small.iter().cloned()).collect();
        let merged = match build::concat_segments(&path, id, columns, &with_metas)? {
            Some(merged) => merged,
            None => {
                let source = || -> Result<_> { Ok(segment_rows(&inputs, columns, &compiled)) };
                build::write_segment(&path, id, columns, source)?
            }
        };
        let expected: u64 = small.iter().map(|s| s.rows).sum();
        if merged.rows != expected {
            let _ = std::fs::remove_file(&path);
            return Err(corrupt(format!(
                "merging {} segments of {name} partition {partition} gave {} rows, not {expected}",
                small.len(),
                merged.rows
            )));
        }
        let gone: std::collections::HashSet<u64> = small.iter().map(|s| s.id).collect();
        manifest.segments.retain(|s| !gone.contains(&s.id));
        manifest.segments.push(merged);
        manifest.segments.sort_by_key(|s| s.first_row_id);
        manifest.next_id = id + 1;
        self.segments.install(
            manifest,
            Cleanup {
                files: inputs,
                rows: None,
            },
        )?;
        if let Some(m) = &*self.metrics.lock().unwrap_or_else(|e| e.into_inner()) {
            m.add("shardline_leaf_segments_merged_total", small.len() as f64);
        }
        tracing::debug!(
            tree = name,
            partition,
            segments = small.len(),
            "merged column segments"
        );
        Ok(true)
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

/// The first segment id from `next` whose file does not exist: a manifest that reached the
/// disk but not memory (a failed install) never has its files overwritten.
fn fresh_segment(dir: &std::path::Path, next: u64) -> (u64, std::path::PathBuf) {
    let mut id = next;
    loop {
        let path = dir.join(format!("seg-{id}.parquet"));
        if !path.exists() {
            return (id, path);
        }
        id += 1;
    }
}

/// The lowest row id a partition's row segment may hold that is not in its segments.
fn first_unflushed(manifest: &segments::PartitionManifest) -> u64 {
    manifest.flushed_through.map_or(0, |through| through + 1)
}

fn crash_point(at: &str) {
    if std::env::var(CRASH_IN_FLUSH).is_ok_and(|v| v == at) {
        tracing::warn!("{CRASH_IN_FLUSH}={at}: aborting the leaf mid-flush");
        std::process::abort();
    }
}

/// The rows of a range of the row segment, their computed columns filled in.
fn tail_rows<'a>(
    entries: sled::Iter,
    columns: &'a [TableColumn],
    compiled: &'a [Option<common::expr::Expr>],
) -> impl Iterator<Item = Result<build::Row>> + 'a {
    entries.flat_map(move |item| {
        let rows: Vec<Result<build::Row>> =
            match item.map_err(StoreError::from).and_then(|(k, v)| {
                let stored = Stored::parse(&k, &v)?;
                stored
                    .rows()
                    .enumerate()
                    .map(|(i, row)| {
                        let mut values: Vec<Json> =
                            serde_json::from_slice(row?.1).map_err(corrupt)?;
                        if values.len() < columns.len() {
                            common::expr::complete_row(&mut values, columns, compiled);
                        }
                        Ok((stored.first + i as u64, values))
                    })
                    .collect::<Result<Vec<_>>>()
            }) {
                Ok(rows) => rows.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
        rows
    })
}

/// The rows of segments, in order, their missing columns computed, read a batch at a time.
fn segment_rows<'a>(
    paths: &'a [std::path::PathBuf],
    columns: &'a [TableColumn],
    compiled: &'a [Option<common::expr::Expr>],
) -> impl Iterator<Item = Result<build::Row>> + 'a {
    paths
        .iter()
        .flat_map(move |path| SegmentRows::open(path, columns, compiled))
}

/// One segment's rows as a merge reads them.
struct SegmentRows<'a> {
    reader: Option<crate::store::segments::file::Batches>,
    /// How many of the table's columns the segment has (the first ones: columns are added
    /// at the end).
    present: usize,
    columns: &'a [TableColumn],
    compiled: &'a [Option<common::expr::Expr>],
    rows: std::vec::IntoIter<build::Row>,
    failed: Option<StoreError>,
}

impl<'a> SegmentRows<'a> {
    fn open(
        path: &std::path::Path,
        columns: &'a [TableColumn],
        compiled: &'a [Option<common::expr::Expr>],
    ) -> Self {
        let mut me = Self {
            reader: None,
            present: 0,
            columns,
            compiled,
            rows: Vec::new().into_iter(),
            failed: None,
        };
        let opened = file::Segment::open(path).and_then(|segment| {
            let schema = segment.schema().clone();
            let present: Vec<&str> = columns
                .iter()
                .map(|c| c.name.as_str())
                .take_while(|n| schema.column_with_name(n).is_some())
                .collect();
            let mut wanted = present.clone();
            wanted.push(file::ROW_ID);
            let groups = segment.row_groups(None);
            let reader = segment.read(&wanted, groups, 4 << 20, 8192, None)?;
            Ok((present.len(), reader))
        });
        match opened {
            Ok((present, reader)) => {
                me.present = present;
                me.reader = Some(reader);
            }
            Err(e) => me.failed = Some(e),
        }
        me
    }

    fn rows_of(&self, b: &datafusion::arrow::array::RecordBatch) -> Result<Vec<build::Row>> {
        let ids = b
            .column_by_name(file::ROW_ID)
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>().cloned())
            .ok_or_else(|| corrupt("a segment without row ids"))?;
        let cells = b
            .project(&(0..self.present).collect::<Vec<_>>())
            .map_err(corrupt)?;
        Ok(common::arrow::batch_to_rows(&cells)
            .into_iter()
            .zip(ids.values())
            .map(|(mut values, id)| {
                common::expr::complete_row(&mut values, self.columns, self.compiled);
                (*id as u64, values)
            })
            .collect())
    }
}

impl Iterator for SegmentRows<'_> {
    type Item = Result<build::Row>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.failed.take() {
            self.reader = None;
            return Some(Err(e));
        }
        loop {
            if let Some(row) = self.rows.next() {
                return Some(Ok(row));
            }
            let batch = match self.reader.as_mut()?.next()? {
                Ok(b) => b,
                Err(e) => {
                    self.reader = None;
                    return Some(Err(corrupt(e)));
                }
            };
            match self.rows_of(&batch) {
                Ok(rows) => self.rows = rows.into_iter(),
                Err(e) => {
                    self.reader = None;
                    return Some(Err(e));
                }
            }
        }
    }
}
