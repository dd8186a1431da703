//! The leaf's partition store in sled.
//!
//! - [`rows`]: one tree per table (`table/<id>`, [`TableRef`]): rows and row groups by
//!   partition and row id;
//! - [`index`]: registered secondary indexes, one tree each (`index/<id>/<name>`), maintained
//!   when rows become visible;
//! - [`tables`]: table ids, tree names, and the removal of dropped tables' storage;
//! - tree `prepared`: one marker per prepared batch: its table, partitions and row id range;
//! - tree `finalized`: batches made visible that the master has not yet heard of (it keeps
//!   every committed batch until its leaf confirms, so a batch's outcome stays known).
//!
//! Rows are written once. Prepare reserves a contiguous range of row ids for the batch,
//! records it (in memory and in the batch's durable marker) and writes the rows straight into
//! their table, where every reader skips them: a reader sees a row only if its id was handed
//! out before the reader started and lies in no prepared batch's range ([`Visibility`]).
//! Finalizing writes the batch's index entries and drops the range, which makes its rows
//! visible; doing it twice (after a crash) changes nothing. Aborting deletes the range's rows.
//!
//! Markers written by earlier versions (rows in a `staging` tree, copied at finalize) are
//! still finalized and aborted that way.

mod flush;
mod index;
mod rows;
pub mod segments;
mod tables;

pub use flush::{TableSnapshot, CRASH_IN_FLUSH};

pub use rows::{encode_group, GROUP_ROWS};
pub use tables::{LiveView, TableRef};

use index::index_entry;
use rows::{batch_rows, row_key, Stored};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Identifies a batch: (pipeline, task, epoch, leaf-side sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BatchKey {
    pub pipeline_id: u64,
    pub task_id: u32,
    pub epoch: u64,
    pub seq: u64,
}

impl BatchKey {
    pub(crate) fn bytes(&self) -> [u8; 28] {
        let mut out = [0u8; 28];
        out[..8].copy_from_slice(&self.pipeline_id.to_be_bytes());
        out[8..12].copy_from_slice(&self.task_id.to_be_bytes());
        out[12..20].copy_from_slice(&self.epoch.to_be_bytes());
        out[20..].copy_from_slice(&self.seq.to_be_bytes());
        out
    }

    pub(crate) fn from_bytes(b: &[u8]) -> Option<Self> {
        Some(BatchKey {
            pipeline_id: u64::from_be_bytes(b.get(..8)?.try_into().ok()?),
            task_id: u32::from_be_bytes(b.get(8..12)?.try_into().ok()?),
            epoch: u64::from_be_bytes(b.get(12..20)?.try_into().ok()?),
            seq: u64::from_be_bytes(b.get(20..28)?.try_into().ok()?),
        })
    }
}

/// Bounds of an index range scan (values as stored JSON).
#[derive(Debug, Clone)]
pub struct Range {
    pub lower: Option<(serde_json::Value, bool)>,
    pub upper: Option<(serde_json::Value, bool)>,
}

#[derive(Serialize, Deserialize)]
struct Marker {
    database: String,
    table: String,
    /// The table's id (absent in markers of tables from before ids: 0).
    #[serde(default)]
    table_id: u64,
    rows: u64,
    /// The batch's row ids, `first..=last` (absent in markers of staged batches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ids: Option<(u64, u64)>,
    /// Partitions the batch wrote to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    partitions: Vec<u32>,
}

impl Marker {
    fn table_ref(&self) -> TableRef {
        TableRef::new(self.table_id, &self.database, &self.table)
    }
}

/// Row ids handed out and the ranges of prepared batches, per table tree.
#[derive(Default)]
struct Pending {
    /// The highest row id handed out.
    high: u64,
    ranges: HashMap<String, Vec<(BatchKey, u64, u64)>>,
}

impl Pending {
    fn remove(&mut self, tree: &str, key: BatchKey) {
        if let Some(r) = self.ranges.get_mut(tree) {
            r.retain(|(k, _, _)| *k != key);
            if r.is_empty() {
                self.ranges.remove(tree);
            }
        }
    }
}

/// Which rows of a table a reader that started at one moment may see: those whose ids were
/// handed out before it and belong to no batch that was still prepared then.
pub struct Visibility {
    high: u64,
    hidden: Vec<(u64, u64)>,
}

impl Visibility {
    /// Whether the row under `row_key` (partition + row id, or anything ending in the id) is
    /// visible.
    pub fn visible(&self, row_key: &[u8]) -> bool {
        let Some(id) = row_key
            .len()
            .checked_sub(8)
            .and_then(|at| row_key[at..].try_into().ok())
            .map(u64::from_be_bytes)
        else {
            return false;
        };
        id <= self.high && !self.hidden.iter().any(|(a, b)| *a <= id && id <= *b)
    }
}

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("partition store: {0}")]
    Sled(#[from] sled::Error),
    #[error("partition store is corrupt: {0}")]
    Corrupt(String),
    #[error("table '{database}'.'{table}' was dropped")]
    TableDropped { database: String, table: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// (table tree, partition) -> (unflushed rows last seen, unchanged since).
type IdleSince = HashMap<(String, u32), (usize, std::time::Instant)>;

/// The leaf's store; clones share it.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    staging: sled::Tree,
    prepared: sled::Tree,
    /// Batches made visible that the master has not yet heard of (key = batch key).
    finalized: sled::Tree,
    indexes: sled::Tree,
    pending: Arc<Mutex<Pending>>,
    /// The last view of live tables the master sent: writers hold it shared, the removal of
    /// dropped tables exclusively.
    live: Arc<std::sync::RwLock<Option<LiveView>>>,
    /// [`Store::tables_generation`].
    swept: Arc<std::sync::atomic::AtomicU64>,
    /// Column segments: committed rows flushed out of the row segment.
    segments: Arc<segments::Segments>,
    /// The columns of each table the leaf loads into (tree name -> columns JSON), what flushes
    /// write.
    columns: sled::Tree,
    columns_cache: Arc<Mutex<HashMap<String, String>>>,
    /// Held by a flush, and by whatever rewrites row-segment rows (backfill).
    flush_lock: Arc<Mutex<()>>,
    /// Per (table tree, partition): the unflushed row count the flusher last saw and since
    /// when it has not changed (an idle partition flushes whatever it holds).
    idle: Arc<Mutex<IdleSince>>,
    metrics: Arc<Mutex<Option<Arc<common::metrics::Metrics>>>>,
}

impl Store {
    /// Where the store counts its flushes.
    pub fn set_metrics(&self, metrics: Arc<common::metrics::Metrics>) {
        *self.metrics.lock().unwrap_or_else(|e| e.into_inner()) = Some(metrics);
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with_cache(dir, None)
    }

    /// [`Store::open`] with the page cache bounded to `cache_bytes` (sled's default when
    /// `None`).
    pub fn open_with_cache(dir: &Path, cache_bytes: Option<u64>) -> Result<Self> {
        let db = common::datadir::open_sled_with_cache(dir, cache_bytes)?;
        let prepared = db.open_tree("prepared")?;
        // Every id handed out before this run is below this one.
        let mut pending = Pending {
            high: db.generate_id()?,
            ..Default::default()
        };
        for item in prepared.iter() {
            let (k, m) = item?;
            let key = BatchKey::from_bytes(&k).ok_or_else(|| corrupt("batch key"))?;
            let marker: Marker = serde_json::from_slice(&m).map_err(corrupt)?;
            if let Some((first, last)) = marker.ids {
                pending
                    .ranges
                    .entry(marker.table_ref().tree())
                    .or_default()
                    .push((key, first, last));
            }
        }
        let (segments, stale) = segments::Segments::open(dir.join("segments"))?;
        let store = Self {
            staging: db.open_tree("staging")?,
            finalized: db.open_tree("finalized")?,
            indexes: db.open_tree("indexes")?,
            columns: db.open_tree("columns")?,
            prepared,
            db,
            pending: Arc::new(Mutex::new(pending)),
            live: Default::default(),
            swept: Default::default(),
            segments: Arc::new(segments),
            columns_cache: Default::default(),
            flush_lock: Default::default(),
            idle: Default::default(),
            metrics: Default::default(),
        };
        // A crash after a flush's manifest, before its rows left the row segment.
        for (tree, partition, through) in stale {
            store.delete_tail_rows(&tree, partition, through)?;
        }
        Ok(store)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a reader starting now may see of a table.
    pub fn visibility(&self, table: &TableRef) -> Visibility {
        let pending = self.pending();
        Visibility {
            high: pending.high,
            hidden: pending
                .ranges
                .get(&table.tree())
                .map(|r| r.iter().map(|(_, a, b)| (*a, *b)).collect())
                .unwrap_or_default(),
        }
    }

    /// Writes a batch's rows (partition, JSON row) into their table, durably and invisibly.
    /// On failure nothing of the batch is left behind.
    pub async fn prepare(
        &self,
        key: BatchKey,
        table: &TableRef,
        rows: &[(u32, String)],
    ) -> Result<()> {
        let result = match self.write_prepared(key, table, rows) {
            Ok(()) => self.db.flush_async().await.map(|_| ()).map_err(Into::into),
            Err(e) => Err(e),
        };
        if result.is_err() {
            if let Err(e) = self.abort(key) {
                tracing::warn!(?key, "cannot remove a batch that failed to prepare: {e}");
            }
        }
        result
    }

    /// The writing part of [`Store::prepare`] (not yet flushed).
    fn write_prepared(
        &self,
        key: BatchKey,
        table: &TableRef,
        rows: &[(u32, String)],
    ) -> Result<()> {
        // A table dropped meanwhile is refused, and not removed while its rows go in.
        let _live = self.writing_to(table)?;
        let k = key.bytes();
        let name = table.tree();
        let tree = self.db.open_tree(&name)?;
        let mut partitions: Vec<u32> = rows.iter().map(|(p, _)| *p).collect();
        partitions.sort_unstable();
        partitions.dedup();
        let ids = if rows.is_empty() {
            None
        } else {
            // A contiguous range, registered (so hidden from readers) before any row exists.
            let mut pending = self.pending();
            let first = self.db.generate_id()?;
            let mut last = first;
            for _ in 1..rows.len() {
                last = self.db.generate_id()?;
            }
            if last - first + 1 != rows.len() as u64 {
                return Err(StoreError::Corrupt(format!(
                    "row ids {first}..={last} for {} rows are not contiguous",
                    rows.len()
                )));
            }
            pending.high = pending.high.max(last);
            pending
                .ranges
                .entry(name.clone())
                .or_default()
                .push((key, first, last));
            Some((first, last))
        };
        let marker = Marker {
            database: table.database.clone(),
            table: table.table.clone(),
            table_id: table.id,
            rows: rows.len() as u64,
            ids,
            partitions,
        };
        // The marker before the rows: a crash leaves no row that no marker hides.
        let m = serde_json::to_vec(&marker).map_err(corrupt)?;
        self.prepared.insert(k, m)?;
        if let Some((first, _)) = ids {
            // Runs of consecutive rows in one partition go into row groups; a lone row stays
            // plain JSON.
            let mut batch = sled::Batch::default();
            let mut id = first;
            for group in rows
                .chunk_by(|a, b| a.0 == b.0)
                .flat_map(|run| run.chunks(GROUP_ROWS))
            {
                let key = row_key(group[0].0, id);
                match group {
                    [(_, row)] => batch.insert(&key, row.as_bytes()),
                    _ => batch.insert(&key, encode_group(group.iter().map(|(_, r)| r.as_bytes()))),
                }
                id += group.len() as u64;
            }
            tree.apply_batch(batch)?;
        }
        Ok(())
    }

    /// Makes a committed batch's rows visible (idempotent).
    pub fn finalize(&self, key: BatchKey) -> Result<u64> {
        // Not beside the removal of a dropped table (its marker goes with it).
        let _live = self.live.read().unwrap_or_else(|e| e.into_inner());
        let k = key.bytes();
        let Some(m) = self.prepared.get(k)? else {
            return Ok(0); // already finalized or aborted
        };
        let marker: Marker = serde_json::from_slice(&m).map_err(corrupt)?;
        let Some(ids) = marker.ids else {
            if marker.rows == 0 {
                self.settled(&k)?;
                return Ok(0);
            }
            return self.finalize_staged(key, &marker);
        };
        let table = marker.table_ref();
        let name = table.tree();
        let tree = self.db.open_tree(&name)?;
        let indexes = self.table_indexes(&table)?;
        if !indexes.is_empty() {
            // Index entries first: a row is never visible without them.
            let mut batches: Vec<sled::Batch> =
                indexes.iter().map(|_| sled::Batch::default()).collect();
            for item in batch_rows(&tree, &marker.partitions, ids) {
                let (k, v) = item?;
                for row in Stored::parse(&k, &v)?.rows() {
                    let (rk, row) = row?;
                    for ((def, compiled), batch) in indexes.iter().zip(batches.iter_mut()) {
                        batch.insert(index_entry(&rk, row, def, compiled)?, &[] as &[u8]);
                    }
                }
            }
            for ((def, _), batch) in indexes.iter().zip(batches) {
                self.db
                    .open_tree(table.index_tree(&def.name))?
                    .apply_batch(batch)?;
            }
        }
        self.pending().remove(&name, key);
        self.settled(&k)?;
        Ok(marker.rows)
    }

    /// Finalizes a batch staged by an earlier version: copies its rows into the table.
    fn finalize_staged(&self, key: BatchKey, marker: &Marker) -> Result<u64> {
        let k = key.bytes();
        let table = marker.table_ref();
        let tree = self.db.open_tree(table.tree())?;
        let mut rows = sled::Batch::default();
        let mut staged = sled::Batch::default();
        let mut n = 0;
        for item in self.staging.scan_prefix(k) {
            let (sk, v) = item?;
            rows.insert(&sk[k.len()..], v);
            staged.remove(sk);
            n += 1;
        }
        let indexes = self.table_indexes(&table)?;
        let mut index_batches: Vec<sled::Batch> =
            indexes.iter().map(|_| sled::Batch::default()).collect();
        for item in self.staging.scan_prefix(k) {
            let (sk, v) = item?;
            let row_key = &sk[k.len()..];
            for ((def, compiled), batch) in indexes.iter().zip(index_batches.iter_mut()) {
                batch.insert(index_entry(row_key, &v, def, compiled)?, &[] as &[u8]);
            }
        }
        for ((def, _), batch) in indexes.iter().zip(index_batches) {
            self.db
                .open_tree(table.index_tree(&def.name))?
                .apply_batch(batch)?;
        }
        tree.apply_batch(rows)?;
        self.staging.apply_batch(staged)?;
        self.settled(&k)?;
        Ok(n)
    }

    /// Drops a batch that will never commit (idempotent).
    pub fn abort(&self, key: BatchKey) -> Result<()> {
        let _live = self.live.read().unwrap_or_else(|e| e.into_inner());
        let k = key.bytes();
        let marker: Option<Marker> = match self.prepared.get(k)? {
            Some(m) => Some(serde_json::from_slice(&m).map_err(corrupt)?),
            None => None,
        };
        if let Some(marker @ Marker { ids: Some(ids), .. }) = &marker {
            let table = marker.table_ref();
            if let Some(tree) = self.table(&table)? {
                let mut rows = sled::Batch::default();
                for item in batch_rows(&tree, &marker.partitions, *ids) {
                    rows.remove(item?.0);
                }
                tree.apply_batch(rows)?;
            }
            // Hidden until gone: the range is dropped only after its rows.
            self.pending().remove(&table.tree(), key);
        }
        let mut staged = sled::Batch::default();
        for item in self.staging.scan_prefix(k) {
            staged.remove(item?.0);
        }
        self.staging.apply_batch(staged)?;
        self.prepared.remove(k)?;
        Ok(())
    }

    /// A committed batch is visible: its marker goes, and it waits in `finalized` until the
    /// master has heard so ([`Store::finalized_batches`]).
    fn settled(&self, key: &[u8; 28]) -> Result<()> {
        self.finalized.insert(key, &[])?;
        self.prepared.remove(key)?;
        Ok(())
    }

    /// Up to `limit` batches made visible that the master has not yet heard of.
    pub fn finalized_batches(&self, limit: usize) -> Result<Vec<BatchKey>> {
        self.finalized
            .iter()
            .keys()
            .take(limit)
            .map(|k| BatchKey::from_bytes(&k?).ok_or_else(|| corrupt("batch key")))
            .collect()
    }

    /// The master has heard that these batches are visible.
    pub fn forget_finalized(&self, keys: &[BatchKey]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.remove(&k.bytes());
        }
        self.finalized.apply_batch(batch)?;
        Ok(())
    }

    /// Batches prepared and not yet finalized or aborted.
    pub fn prepared_batches(&self) -> Result<Vec<BatchKey>> {
        self.prepared
            .iter()
            .keys()
            .map(|k| {
                let k = k?;
                BatchKey::from_bytes(&k).ok_or_else(|| StoreError::Corrupt("batch key".into()))
            })
            .collect()
    }

    /// Calls `each` with every committed row of a table (a JSON array) that a reader starting
    /// now sees, in storage order, until it returns `false`.
    pub fn for_each_row(
        &self,
        table: &TableRef,
        mut each: impl FnMut(&[u8]) -> Result<bool>,
    ) -> Result<()> {
        let visibility = self.visibility(table);
        let Some(tree) = self.table(table)? else {
            return Ok(());
        };
        for item in tree.iter() {
            let (k, v) = item?;
            if !visibility.visible(&k) {
                continue;
            }
            for row in Stored::parse(&k, &v)?.rows() {
                if !each(row?.1)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Committed rows of a table (JSON arrays).
    pub fn scan(&self, table: &TableRef) -> Result<Vec<String>> {
        let mut out = Vec::new();
        self.for_each_row(table, |row| {
            out.push(String::from_utf8(row.to_vec()).map_err(corrupt)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// How many rows of a table a reader sees now (what [`Store::scan`] would return).
    pub fn count(&self, table: &TableRef) -> Result<usize> {
        let mut n = 0;
        self.each_visible(table, |stored| {
            n += stored.count;
            Ok(())
        })?;
        Ok(n)
    }

    /// Calls `each` with every stored entry of a table that a reader starting now sees (a row
    /// group holds rows of one batch: they are visible together).
    fn each_visible(
        &self,
        table: &TableRef,
        mut each: impl FnMut(Stored<'_>) -> Result<()>,
    ) -> Result<()> {
        let visibility = self.visibility(table);
        let Some(tree) = self.table(table)? else {
            return Ok(());
        };
        for item in tree.iter() {
            let (k, v) = item?;
            if visibility.visible(&k) {
                each(Stored::parse(&k, &v)?)?;
            }
        }
        Ok(())
    }

    /// Rewrites the rows of a table that lack columns added since they were written, with
    /// `complete` filling them in. Returns how many rows changed.
    pub fn backfill(
        &self,
        table: &TableRef,
        complete: impl Fn(&mut Vec<serde_json::Value>),
        width: usize,
    ) -> Result<u64> {
        // Not beside a flush: the rows it rewrites may be on their way into a segment.
        let _flushing = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tree) = self.table(table)? else {
            return Ok(0);
        };
        let mut n = 0;
        for item in tree.iter() {
            let (k, v) = item?;
            let stored = Stored::parse(&k, &v)?;
            let mut rows = Vec::with_capacity(stored.count);
            let mut changed = 0;
            for row in stored.rows() {
                let mut row: Vec<serde_json::Value> =
                    serde_json::from_slice(row?.1).map_err(corrupt)?;
                if row.len() < width {
                    complete(&mut row);
                    changed += 1;
                }
                rows.push(serde_json::to_vec(&row).map_err(corrupt)?);
            }
            if changed == 0 {
                continue;
            }
            let new = if stored.grouped() {
                encode_group(rows.iter().map(Vec::as_slice))
            } else {
                rows.swap_remove(0)
            };
            // Only replace what we read: a concurrent writer's version wins.
            if tree.compare_and_swap(&k, Some(v), Some(new))?.is_ok() {
                n += changed;
            }
        }
        Ok(n)
    }

    /// A table's tree, if any row of it was ever stored here.
    fn table(&self, table: &TableRef) -> Result<Option<sled::Tree>> {
        let name = table.tree();
        if !self
            .db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == name.as_bytes())
        {
            return Ok(None);
        }
        Ok(Some(self.db.open_tree(name)?))
    }

    pub async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table the tests write to.
    fn t() -> TableRef {
        TableRef::new(5, "d", "t")
    }

    fn key(seq: u64) -> BatchKey {
        BatchKey {
            pipeline_id: 1,
            task_id: 2,
            epoch: 3,
            seq,
        }
    }

    /// Opens a store again right after the last handle was dropped: sled's background threads
    /// may hold the directory's lock for a moment longer (a process that restarts finds it free).
    fn reopen(dir: &Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(dir) {
                Ok(s) => return s,
                Err(StoreError::Sled(sled::Error::Io(e)))
                    if e.kind() == std::io::ErrorKind::Other
                        && e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("cannot reopen the store: {e}"),
            }
        }
    }

    /// Prepares batch `seq` of table d.t with `rows` (partition, JSON row).
    async fn prepare(s: &Store, seq: u64, rows: &[(u32, &str)]) {
        let rows: Vec<(u32, String)> = rows.iter().map(|(p, r)| (*p, r.to_string())).collect();
        s.prepare(key(seq), &t(), &rows).await.unwrap();
    }

    /// The rows of d.t a reader sees now: in segments, and in the row segment above them.
    fn visible_rows(s: &Store) -> (Vec<i64>, Vec<String>) {
        let snap = s.table_snapshot(&t());
        let mut in_segments = Vec::new();
        for (path, _) in Store::snapshot_segments(&snap) {
            let seg = segments::file::Segment::open(&path).unwrap();
            let groups = seg.row_groups(None);
            for b in seg.read(&["n"], groups, 1 << 20, 8192, None).unwrap() {
                let b = b.unwrap();
                let col = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<datafusion::arrow::array::Int64Array>()
                    .unwrap();
                in_segments.extend(col.iter().flatten());
            }
        }
        let mut tail = Vec::new();
        s.for_each_tail_row(&t(), &snap, |r| {
            tail.push(String::from_utf8(r.to_vec()).unwrap());
            Ok(true)
        })
        .unwrap();
        in_segments.sort_unstable();
        tail.sort();
        (in_segments, tail)
    }

    #[tokio::test]
    async fn a_flush_moves_committed_rows_into_a_segment_and_leaves_prepared_ones() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.note_columns(
            &t(),
            r#"[{"name":"n","ty":"BigInt","nullable":true,"computed":null}]"#,
        )
        .unwrap();
        prepare(&s, 1, &[(0, "[1]"), (0, "[2]"), (1, "[3]")]).await;
        s.finalize(key(1)).unwrap();
        prepare(&s, 2, &[(0, "[4]")]).await; // still prepared: stays in the row segment
        prepare(&s, 3, &[(0, "[5]")]).await;
        s.finalize(key(3)).unwrap(); // committed, but above a prepared batch
        assert_eq!(s.flush_segments(1).unwrap(), 2, "partitions 0 and 1");
        assert_eq!(visible_rows(&s), (vec![1, 2, 3], vec!["[5]".to_string()]));
        s.finalize(key(2)).unwrap();
        assert_eq!(
            visible_rows(&s).1,
            vec!["[4]".to_string(), "[5]".to_string()]
        );
        assert_eq!(s.flush_segments(2).unwrap(), 1);
        assert_eq!(visible_rows(&s), (vec![1, 2, 3, 4, 5], vec![]));
        assert_eq!(s.flush_segments(1).unwrap(), 0, "nothing left to flush");
        // A reader that started before a flush keeps reading the rows where it found them.
        prepare(&s, 4, &[(1, "[6]")]).await;
        s.finalize(key(4)).unwrap();
        let before = s.table_snapshot(&t());
        assert_eq!(s.flush_segments(1).unwrap(), 1);
        let mut tail = Vec::new();
        s.for_each_tail_row(&t(), &before, |r| {
            tail.push(r.to_vec());
            Ok(true)
        })
        .unwrap();
        assert_eq!(
            tail,
            vec![b"[6]".to_vec()],
            "still in the row segment for the old reader"
        );
        drop(before);
        s.clean_up().unwrap();
        drop(s);
        let s = reopen(dir.path());
        assert_eq!(visible_rows(&s), (vec![1, 2, 3, 4, 5, 6], vec![]));
        assert_eq!(
            s.scan(&t()).unwrap(),
            Vec::<String>::new(),
            "the row segment is empty"
        );
    }

    #[tokio::test]
    async fn small_segments_merge_into_one_and_a_reader_keeps_the_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.note_columns(
            &t(),
            r#"[{"name":"n","ty":"BigInt","nullable":true,"computed":null}]"#,
        )
        .unwrap();
        let mut reader = None;
        for i in 0..8u64 {
            prepare(&s, i + 1, &[(0, &format!("[{i}]"))]).await;
            s.finalize(key(i + 1)).unwrap();
            if i == 7 {
                reader = Some(s.table_snapshot(&t()));
            }
            s.flush_segments(1).unwrap();
        }
        let segments = |s: &Store| Store::snapshot_segments(&s.table_snapshot(&t()));
        assert_eq!(segments(&s).len(), 1, "eight small segments became one");
        assert_eq!(visible_rows(&s).0, (0..8).collect::<Vec<i64>>());
        // The reader from before the merge still finds its files.
        let old = reader.take().unwrap();
        for (path, _) in Store::snapshot_segments(&old) {
            assert!(
                path.exists(),
                "{} went while a reader held it",
                path.display()
            );
        }
        drop(old);
        s.clean_up().unwrap();
        let parts = s.manifests();
        let pdir = &parts[0].dir;
        let on_disk = std::fs::read_dir(pdir).unwrap().count();
        assert_eq!(on_disk, 2, "the merged segment and the manifest");
    }

    #[tokio::test]
    async fn prepared_rows_are_invisible_until_finalized_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        prepare(&s, 1, &[(0, "[1]"), (1, "[2]")]).await;
        prepare(&s, 2, &[(0, "[3]")]).await;
        assert!(s.scan(&t()).unwrap().is_empty());
        assert_eq!(s.count(&t()).unwrap(), 0, "count sees what scan sees");
        drop(s);
        let s = reopen(dir.path());
        assert_eq!(s.prepared_batches().unwrap(), vec![key(1), key(2)]);
        assert_eq!(s.finalize(key(1)).unwrap(), 2);
        assert_eq!(s.finalize(key(1)).unwrap(), 0, "finalize is idempotent");
        s.abort(key(2)).unwrap();
        let mut rows = s.scan(&t()).unwrap();
        rows.sort();
        assert_eq!(rows, vec!["[1]", "[2]"]);
        assert_eq!(s.count(&t()).unwrap(), 2);
        assert_eq!(s.count(&TableRef::new(99, "d", "nope")).unwrap(), 0);
        assert!(s.prepared_batches().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_reader_sees_neither_prepared_rows_nor_rows_newer_than_itself() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        prepare(&s, 1, &[(0, "[1]")]).await;
        s.finalize(key(1)).unwrap();
        let before = s.visibility(&t());
        prepare(&s, 2, &[(0, "[2]"), (3, "[3]")]).await;
        s.finalize(key(2)).unwrap();
        let tree = s.table(&t()).unwrap().unwrap();
        let seen: Vec<_> = tree
            .iter()
            .keys()
            .map(|k| k.unwrap())
            .filter(|k| before.visible(k))
            .collect();
        assert_eq!(
            seen.len(),
            1,
            "rows finalized after a reader started are not its"
        );
        assert_eq!(s.scan(&t()).unwrap().len(), 3);
    }

    #[tokio::test]
    async fn aborting_deletes_the_rows_and_keeps_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        prepare(&s, 1, &[(0, "[1]"), (1, "[2]")]).await;
        prepare(&s, 2, &[(0, "[3]"), (1, "[4]")]).await;
        s.abort(key(1)).unwrap();
        s.abort(key(1)).unwrap();
        assert_eq!(
            s.finalize(key(1)).unwrap(),
            0,
            "an aborted batch stays aborted"
        );
        assert!(s.scan(&t()).unwrap().is_empty());
        drop(s);
        let s = reopen(dir.path());
        assert!(
            s.scan(&t()).unwrap().is_empty(),
            "still hidden after reopen"
        );
        assert_eq!(s.finalize(key(2)).unwrap(), 2);
        let mut rows = s.scan(&t()).unwrap();
        rows.sort();
        assert_eq!(rows, vec!["[3]", "[4]"]);
        assert_eq!(s.table(&t()).unwrap().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn an_index_built_over_prepared_rows_shows_them_only_once_finalized() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        prepare(&s, 1, &[(0, "[5]"), (0, "[6]")]).await;
        prepare(&s, 2, &[(0, "[7]")]).await;
        s.finalize(key(2)).unwrap();
        let columns = r#"[{"name":"v","ty":"BigInt","nullable":true,"computed":null}]"#;
        assert_eq!(s.build_index(&t(), "i", 0, columns).unwrap(), 1);
        let all = Range {
            lower: None,
            upper: None,
        };
        assert_eq!(
            s.scan_index(&t(), "i", &all, &s.table_snapshot(&t()))
                .unwrap()
                .unwrap(),
            vec!["[7]"]
        );
        s.finalize(key(1)).unwrap();
        let mut rows = s
            .scan_index(&t(), "i", &all, &s.table_snapshot(&t()))
            .unwrap()
            .unwrap();
        rows.sort();
        assert_eq!(rows, vec!["[5]", "[6]", "[7]"]);
    }

    #[tokio::test]
    async fn a_batch_staged_by_an_earlier_version_is_finalized_by_copy() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let k = key(9).bytes();
        let mut sk = k.to_vec();
        sk.extend_from_slice(&row_key(2, 0));
        s.staging.insert(sk, "[42]").unwrap(); // ids of earlier runs are below `high`
        s.prepared
            .insert(k, r#"{"database":"d","table":"t","rows":1}"#)
            .unwrap();
        let legacy = TableRef::new(0, "d", "t");
        assert!(s.scan(&legacy).unwrap().is_empty());
        assert_eq!(s.finalize(key(9)).unwrap(), 1);
        assert_eq!(s.scan(&legacy).unwrap(), vec!["[42]"]);
        assert!(s.staging.is_empty());
    }

    #[tokio::test]
    async fn row_groups_hold_many_rows_per_entry_and_every_reader_sees_rows() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let texts: Vec<String> = (0..600).map(|i| format!("[{i}]")).collect();
        let rows: Vec<(u32, &str)> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (u32::from(i >= 300), t.as_str()))
            .collect();
        prepare(&s, 1, &rows).await;
        let tree = s.table(&t()).unwrap().unwrap();
        assert_eq!(tree.len(), 4, "256 + 44 rows in each of two partitions");
        assert_eq!(s.count(&t()).unwrap(), 0);
        s.finalize(key(1)).unwrap();
        let numbers = |rows: Vec<String>| -> Vec<i64> {
            let mut v: Vec<i64> = rows
                .iter()
                .map(|r| serde_json::from_str::<Vec<i64>>(r).unwrap()[0])
                .collect();
            v.sort_unstable();
            v
        };
        assert_eq!(numbers(s.scan(&t()).unwrap()), (0..600).collect::<Vec<_>>());
        assert_eq!(s.count(&t()).unwrap(), 600);

        // Index lookups find single rows inside groups, across a group boundary too.
        let columns = r#"[{"name":"v","ty":"BigInt","nullable":true,"computed":null}]"#;
        assert_eq!(s.build_index(&t(), "i", 0, columns).unwrap(), 600);
        let range = |lo: i64, hi: i64| Range {
            lower: Some((serde_json::json!(lo), true)),
            upper: Some((serde_json::json!(hi), true)),
        };
        let found = |lo, hi| {
            numbers(
                s.scan_index(&t(), "i", &range(lo, hi), &s.table_snapshot(&t()))
                    .unwrap()
                    .unwrap(),
            )
        };
        assert_eq!(found(255, 257), vec![255, 256, 257]);
        assert_eq!(found(299, 300), vec![299, 300]);
        assert_eq!(found(599, 700), vec![599]);

        // A grouped batch that aborts leaves nothing behind.
        let more: Vec<(u32, &str)> = (0..300).map(|_| (0, "[-1]")).collect();
        prepare(&s, 2, &more).await;
        s.abort(key(2)).unwrap();
        assert_eq!(tree.len(), 4);
        assert_eq!(s.count(&t()).unwrap(), 600);

        // Backfill rewrites whole groups.
        let width = 2;
        let changed = s
            .backfill(&t(), |r| r.push(serde_json::json!(0)), width)
            .unwrap();
        assert_eq!(changed, 600);
        assert_eq!(tree.len(), 4);
        assert!(s.scan(&t()).unwrap().iter().all(|r| r.ends_with(",0]")));
        assert_eq!(found(256, 256), vec![256]);
        drop((s, tree));
        let s = reopen(dir.path());
        assert_eq!(s.count(&t()).unwrap(), 600, "after reopen");
    }

    #[tokio::test]
    async fn a_dropped_table_leaves_nothing_and_a_new_one_of_its_name_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        prepare(&s, 1, &[(0, "[1]"), (1, "[2]")]).await;
        s.finalize(key(1)).unwrap();
        let columns = r#"[{"name":"v","ty":"BigInt","nullable":true,"computed":null}]"#;
        s.build_index(&t(), "i", 0, columns).unwrap();
        prepare(&s, 2, &[(0, "[3]")]).await; // still prepared when the table goes
        let other = TableRef::new(6, "d", "other");
        s.prepare(key(3), &other, &[(0, "[9]".to_string())])
            .await
            .unwrap();
        s.finalize(key(3)).unwrap();
        assert_eq!(s.stored_tables(), vec![5, 6]);

        // Table 5 was dropped; 6 lives; 7 is newer than the view.
        let view = LiveView {
            generation: 2,
            high: 6,
            ids: [6].into(),
            legacy: Default::default(),
        };
        let dropped = s.retain_tables(view).unwrap();
        assert_eq!(dropped.len(), 2, "rows and index: {dropped:?}");
        assert_eq!(s.tables_generation(), 2);
        assert_eq!(s.stored_tables(), vec![6]);
        assert!(s.prepared_batches().unwrap().is_empty());
        assert!(s.indexes.is_empty());
        assert_eq!(s.count(&other).unwrap(), 1);
        assert_eq!(s.finalize(key(2)).unwrap(), 0, "its batch went with it");
        assert!(matches!(
            s.prepare(key(4), &t(), &[(0, "[4]".to_string())]).await,
            Err(StoreError::TableDropped { .. })
        ));
        assert!(s.prepared_batches().unwrap().is_empty());

        // The same name again, under a new id: empty.
        let again = TableRef::new(7, "d", "t");
        assert_eq!(s.count(&again).unwrap(), 0);
        s.prepare(key(5), &again, &[(0, "[5]".to_string())])
            .await
            .unwrap();
        s.finalize(key(5)).unwrap();
        assert_eq!(s.scan(&again).unwrap(), vec!["[5]"]);
    }
}
