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

    /// The row segment's committed rows of a table (JSON arrays) a reader starting now sees.
    #[cfg(test)]
    pub fn scan(&self, table: &TableRef) -> Result<Vec<String>> {
        let mut out = Vec::new();
        self.for_each_tail_row(table, &self.table_snapshot(table), |row| {
            out.push(String::from_utf8(row.to_vec()).map_err(corrupt)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// How many rows [`Store::scan`] would return.
    #[cfg(test)]
    pub fn count(&self, table: &TableRef) -> Result<usize> {
        self.count_tail(table, &self.table_snapshot(table))
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
mod tests;
