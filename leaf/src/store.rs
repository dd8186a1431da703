//! The leaf's partition store in sled.
//!
//! - one tree per table (`table/<db>/<table>` as JSON): key = partition (u32 BE) + row id
//!   (u64 BE), value = the row as a JSON array of column values, or a *row group*: up to
//!   [`GROUP_ROWS`] consecutive rows of one batch in one partition, with ids from the key's
//!   on (one sled entry instead of one per row: sled's cost is per entry);
//! - tree `prepared`: one marker per prepared batch: its table, partitions and row id range;
//! - tree `indexes`: registered secondary indexes; tree `index/<db>/<table>/<index>`: key =
//!   order-preserving value encoding + row key, maintained when rows become visible.
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
    fn bytes(&self) -> [u8; 28] {
        let mut out = [0u8; 28];
        out[..8].copy_from_slice(&self.pipeline_id.to_be_bytes());
        out[8..12].copy_from_slice(&self.task_id.to_be_bytes());
        out[12..20].copy_from_slice(&self.epoch.to_be_bytes());
        out[20..].copy_from_slice(&self.seq.to_be_bytes());
        out
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        Some(BatchKey {
            pipeline_id: u64::from_be_bytes(b.get(..8)?.try_into().ok()?),
            task_id: u32::from_be_bytes(b.get(8..12)?.try_into().ok()?),
            epoch: u64::from_be_bytes(b.get(12..20)?.try_into().ok()?),
            seq: u64::from_be_bytes(b.get(20..28)?.try_into().ok()?),
        })
    }
}

/// A registered index: which column, and the table's columns to compute it for old rows.
#[derive(Clone, Serialize, Deserialize)]
struct IndexDef {
    database: String,
    table: String,
    name: String,
    position: usize,
    columns_json: String,
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
    rows: u64,
    /// The batch's row ids, `first..=last` (absent in markers of staged batches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ids: Option<(u64, u64)>,
    /// Partitions the batch wrote to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    partitions: Vec<u32>,
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

/// The rows of a batch: ids `first..=last` in each of its partitions.
fn batch_rows<'a>(
    tree: &'a sled::Tree,
    partitions: &'a [u32],
    (first, last): (u64, u64),
) -> impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + 'a {
    partitions
        .iter()
        .flat_map(move |p| tree.range(row_key(*p, first)..=row_key(*p, last)))
}

/// An index's entry for a stored row: the indexed value's encoding, then the row key.
fn index_entry(
    row_key: &[u8],
    row: &[u8],
    def: &IndexDef,
    compiled: &(
        Vec<common::catalog::tables::TableColumn>,
        Vec<Option<common::expr::Expr>>,
    ),
) -> Result<Vec<u8>> {
    let mut key = common::expr::index_key(&indexed_value(row, def, compiled)?);
    key.extend_from_slice(row_key);
    Ok(key)
}

/// Most rows in one stored entry. Large enough that sled's per-entry cost is spread thin,
/// small enough that an index lookup reads little beside its row.
pub const GROUP_ROWS: usize = 256;

/// First byte of a row group; a single row is JSON text and starts with `[`.
const GROUP_TAG: u8 = 0x01;

/// A row group: the tag, the row count (u32 LE), each row's end offset (u32 LE), the rows.
/// Public for the storage ceiling (`bench-sled --group`), which writes what the leaves write.
pub fn encode_group<'a>(rows: impl ExactSizeIterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let count = rows.len();
    let bytes: usize = rows.clone().map(<[u8]>::len).sum();
    let mut out = Vec::with_capacity(5 + 4 * count + bytes);
    out.push(GROUP_TAG);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    let mut end = 0u32;
    for r in rows.clone() {
        end += r.len() as u32;
        out.extend_from_slice(&end.to_le_bytes());
    }
    for r in rows {
        out.extend_from_slice(r);
    }
    out
}

/// The rows stored under one entry: how many, and row `i` of them.
struct Stored<'a> {
    partition: u32,
    first: u64,
    value: &'a [u8],
    count: usize,
}

/// The partition and row id of a row key (the inverse of [`row_key`]).
fn parse_row_key(key: &[u8]) -> Result<(u32, u64)> {
    let (Some(p), Some(id)) = (key.get(..4), key.get(4..12)) else {
        return Err(corrupt("short row key"));
    };
    Ok((
        u32::from_be_bytes(p.try_into().map_err(corrupt)?),
        u64::from_be_bytes(id.try_into().map_err(corrupt)?),
    ))
}

impl<'a> Stored<'a> {
    fn parse(key: &[u8], value: &'a [u8]) -> Result<Self> {
        let (partition, first) = parse_row_key(key)?;
        let count = if value.first() == Some(&GROUP_TAG) {
            let n = value.get(1..5).ok_or_else(|| corrupt("row group header"))?;
            let n = u32::from_le_bytes(n.try_into().map_err(corrupt)?) as usize;
            if value.len() < 5 + 4 * n {
                return Err(corrupt("row group offsets"));
            }
            n
        } else {
            1
        };
        Ok(Stored {
            partition,
            first,
            value,
            count,
        })
    }

    fn grouped(&self) -> bool {
        self.value.first() == Some(&GROUP_TAG)
    }

    /// Row `i` (id `first + i`).
    fn row(&self, i: usize) -> Result<&'a [u8]> {
        if !self.grouped() {
            return Ok(self.value);
        }
        let end_of = |j: usize| -> Result<usize> {
            let at = 5 + 4 * j;
            let b = self
                .value
                .get(at..at + 4)
                .ok_or_else(|| corrupt("row group offset"))?;
            Ok(u32::from_le_bytes(b.try_into().map_err(corrupt)?) as usize)
        };
        let start = if i == 0 { 0 } else { end_of(i - 1)? };
        let end = end_of(i)?;
        let data = 5 + 4 * self.count;
        self.value
            .get(data + start..data + end)
            .ok_or_else(|| corrupt("row group data"))
    }

    /// Every row with its own row key.
    fn rows(&self) -> impl Iterator<Item = Result<([u8; 12], &'a [u8])>> + '_ {
        (0..self.count).map(|i| Ok((row_key(self.partition, self.first + i as u64), self.row(i)?)))
    }
}

fn row_key(partition: u32, id: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&partition.to_be_bytes());
    k[4..].copy_from_slice(&id.to_be_bytes());
    k
}

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("partition store: {0}")]
    Sled(#[from] sled::Error),
    #[error("partition store is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The leaf's store; clones share it.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    staging: sled::Tree,
    prepared: sled::Tree,
    indexes: sled::Tree,
    pending: Arc<Mutex<Pending>>,
}

fn table_tree(database: &str, table: &str) -> String {
    format!("table/{}", serde_json::json!([database, table]))
}

fn index_tree(database: &str, table: &str, index: &str) -> String {
    format!("index/{}", serde_json::json!([database, table, index]))
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// The indexed value of a stored row, computing a column the row predates.
fn indexed_value(
    row: &[u8],
    def: &IndexDef,
    compiled: &(
        Vec<common::catalog::tables::TableColumn>,
        Vec<Option<common::expr::Expr>>,
    ),
) -> Result<serde_json::Value> {
    let mut values: Vec<serde_json::Value> = serde_json::from_slice(row).map_err(corrupt)?;
    if values.len() <= def.position {
        common::expr::complete_row(&mut values, &compiled.0, &compiled.1);
    }
    Ok(values
        .get(def.position)
        .cloned()
        .unwrap_or(serde_json::Value::Null))
}

/// The row stored under `row_key`, alone or in a row group.
fn get_row(tree: &sled::Tree, row_key: &[u8]) -> Result<Option<Vec<u8>>> {
    let (partition, id) = parse_row_key(row_key)?;
    let Some((k, v)) = tree.range(..=row_key).next_back().transpose()? else {
        return Ok(None);
    };
    // The last entry at or below the key: the row's own, or one that does not hold it.
    let stored = Stored::parse(&k, &v)?;
    match id.checked_sub(stored.first).map(|i| i as usize) {
        Some(i) if stored.partition == partition && i < stored.count => {
            Ok(Some(stored.row(i)?.to_vec()))
        }
        _ => Ok(None),
    }
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self> {
        let db = common::datadir::open_sled(dir)?;
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
                    .entry(table_tree(&marker.database, &marker.table))
                    .or_default()
                    .push((key, first, last));
            }
        }
        Ok(Self {
            staging: db.open_tree("staging")?,
            indexes: db.open_tree("indexes")?,
            prepared,
            db,
            pending: Arc::new(Mutex::new(pending)),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a reader starting now may see of a table.
    pub fn visibility(&self, database: &str, table: &str) -> Visibility {
        let pending = self.pending();
        Visibility {
            high: pending.high,
            hidden: pending
                .ranges
                .get(&table_tree(database, table))
                .map(|r| r.iter().map(|(_, a, b)| (*a, *b)).collect())
                .unwrap_or_default(),
        }
    }

    /// Writes a batch's rows (partition, JSON row) into their table, durably and invisibly.
    /// On failure nothing of the batch is left behind.
    pub async fn prepare(
        &self,
        key: BatchKey,
        database: &str,
        table: &str,
        rows: &[(u32, String)],
    ) -> Result<()> {
        let result = async {
            let k = key.bytes();
            let name = table_tree(database, table);
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
                database: database.into(),
                table: table.into(),
                rows: rows.len() as u64,
                ids,
                partitions,
            };
            // The marker before the rows: a crash leaves no row that no marker hides.
            let m = serde_json::to_vec(&marker).map_err(corrupt)?;
            self.prepared.insert(k, m)?;
            if let Some((first, _)) = ids {
                // Runs of consecutive rows in one partition go into row groups; a lone row
                // stays plain JSON.
                let mut batch = sled::Batch::default();
                let mut id = first;
                for group in rows
                    .chunk_by(|a, b| a.0 == b.0)
                    .flat_map(|run| run.chunks(GROUP_ROWS))
                {
                    let key = row_key(group[0].0, id);
                    match group {
                        [(_, row)] => batch.insert(&key, row.as_bytes()),
                        _ => batch
                            .insert(&key, encode_group(group.iter().map(|(_, r)| r.as_bytes()))),
                    }
                    id += group.len() as u64;
                }
                tree.apply_batch(batch)?;
            }
            self.db.flush_async().await?;
            Ok(())
        }
        .await;
        if result.is_err() {
            if let Err(e) = self.abort(key) {
                tracing::warn!(?key, "cannot remove a batch that failed to prepare: {e}");
            }
        }
        result
    }

    /// Makes a committed batch's rows visible (idempotent).
    pub fn finalize(&self, key: BatchKey) -> Result<u64> {
        let k = key.bytes();
        let Some(m) = self.prepared.get(k)? else {
            return Ok(0); // already finalized or aborted
        };
        let marker: Marker = serde_json::from_slice(&m).map_err(corrupt)?;
        let Some(ids) = marker.ids else {
            if marker.rows == 0 {
                self.prepared.remove(k)?;
                return Ok(0);
            }
            return self.finalize_staged(key, &marker);
        };
        let name = table_tree(&marker.database, &marker.table);
        let tree = self.db.open_tree(&name)?;
        let indexes = self.table_indexes(&marker.database, &marker.table)?;
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
                    .open_tree(index_tree(&def.database, &def.table, &def.name))?
                    .apply_batch(batch)?;
            }
        }
        self.pending().remove(&name, key);
        self.prepared.remove(k)?;
        Ok(marker.rows)
    }

    /// Finalizes a batch staged by an earlier version: copies its rows into the table.
    fn finalize_staged(&self, key: BatchKey, marker: &Marker) -> Result<u64> {
        let k = key.bytes();
        let tree = self
            .db
            .open_tree(table_tree(&marker.database, &marker.table))?;
        let mut rows = sled::Batch::default();
        let mut staged = sled::Batch::default();
        let mut n = 0;
        for item in self.staging.scan_prefix(k) {
            let (sk, v) = item?;
            rows.insert(&sk[k.len()..], v);
            staged.remove(sk);
            n += 1;
        }
        let indexes = self.table_indexes(&marker.database, &marker.table)?;
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
                .open_tree(index_tree(&def.database, &def.table, &def.name))?
                .apply_batch(batch)?;
        }
        tree.apply_batch(rows)?;
        self.staging.apply_batch(staged)?;
        self.prepared.remove(k)?;
        Ok(n)
    }

    #[allow(clippy::type_complexity)]
    fn table_indexes(
        &self,
        database: &str,
        table: &str,
    ) -> Result<
        Vec<(
            IndexDef,
            (
                Vec<common::catalog::tables::TableColumn>,
                Vec<Option<common::expr::Expr>>,
            ),
        )>,
    > {
        let prefix = serde_json::json!([database, table]).to_string();
        let prefix = &prefix[..prefix.len() - 1];
        let mut out = Vec::new();
        for item in self.indexes.scan_prefix(prefix.as_bytes()) {
            let (_, v) = item?;
            let def: IndexDef = serde_json::from_slice(&v).map_err(corrupt)?;
            if def.database != database || def.table != table {
                continue;
            }
            let columns: Vec<common::catalog::tables::TableColumn> =
                serde_json::from_str(&def.columns_json).map_err(corrupt)?;
            let compiled = common::expr::compile_table(&columns).map_err(corrupt)?;
            out.push((def, (columns, compiled)));
        }
        Ok(out)
    }

    /// Registers an index (maintained by every later finalize) and indexes the rows stored,
    /// prepared ones too: readers check visibility, and an aborted row's entry finds no row.
    /// Returns how many visible rows were indexed.
    pub fn build_index(
        &self,
        database: &str,
        table: &str,
        name: &str,
        position: usize,
        columns_json: &str,
    ) -> Result<u64> {
        let def = IndexDef {
            database: database.into(),
            table: table.into(),
            name: name.into(),
            position,
            columns_json: columns_json.into(),
        };
        let key = serde_json::json!([database, table, name]).to_string();
        self.indexes
            .insert(key.as_bytes(), serde_json::to_vec(&def).map_err(corrupt)?)?;
        let columns: Vec<common::catalog::tables::TableColumn> =
            serde_json::from_str(columns_json).map_err(corrupt)?;
        let compiled = (
            columns.clone(),
            common::expr::compile_table(&columns).map_err(corrupt)?,
        );
        let index = self.db.open_tree(index_tree(database, table, name))?;
        let visibility = self.visibility(database, table);
        let Some(tree) = self.table(database, table)? else {
            return Ok(0);
        };
        let mut n = 0;
        let mut batch = sled::Batch::default();
        for item in tree.iter() {
            let (k, v) = item?;
            let stored = Stored::parse(&k, &v)?;
            for row in stored.rows() {
                let (rk, row) = row?;
                batch.insert(index_entry(&rk, row, &def, &compiled)?, &[] as &[u8]);
            }
            if visibility.visible(&k) {
                n += stored.count as u64;
            }
        }
        index.apply_batch(batch)?;
        Ok(n)
    }

    pub fn drop_index(&self, database: &str, table: &str, name: &str) -> Result<()> {
        let key = serde_json::json!([database, table, name]).to_string();
        self.indexes.remove(key.as_bytes())?;
        self.db.drop_tree(index_tree(database, table, name))?;
        Ok(())
    }

    /// Committed rows whose indexed value is in `range`, via the index; `None` if this leaf
    /// has no such index (the caller scans instead).
    pub fn scan_index(
        &self,
        database: &str,
        table: &str,
        index: &str,
        range: &Range,
    ) -> Result<Option<Vec<String>>> {
        let key = serde_json::json!([database, table, index]).to_string();
        if self.indexes.get(key.as_bytes())?.is_none() {
            return Ok(None);
        }
        let visibility = self.visibility(database, table);
        let tree = self.db.open_tree(table_tree(database, table))?;
        let idx = self.db.open_tree(index_tree(database, table, index))?;
        let after = |v: &serde_json::Value| {
            let mut k = common::expr::index_key(v);
            k.extend_from_slice(&[0xFF; 13]);
            k
        };
        let lo = match &range.lower {
            None => vec![],
            Some((v, true)) => common::expr::index_key(v),
            Some((v, false)) => after(v),
        };
        let hi = match &range.upper {
            None => vec![0xFF; 16],
            Some((v, true)) => after(v),
            Some((v, false)) => common::expr::index_key(v),
        };
        if lo >= hi {
            return Ok(Some(vec![]));
        }
        let mut out = Vec::new();
        for item in idx.range(lo..hi) {
            let (k, _) = item?;
            let row_key = &k[k.len().saturating_sub(12)..];
            if !visibility.visible(row_key) {
                continue;
            }
            if let Some(v) = get_row(&tree, row_key)? {
                out.push(String::from_utf8(v).map_err(corrupt)?);
            }
        }
        Ok(Some(out))
    }

    /// Drops a batch that will never commit (idempotent).
    pub fn abort(&self, key: BatchKey) -> Result<()> {
        let k = key.bytes();
        let marker: Option<Marker> = match self.prepared.get(k)? {
            Some(m) => Some(serde_json::from_slice(&m).map_err(corrupt)?),
            None => None,
        };
        if let Some(Marker {
            database,
            table,
            ids: Some(ids),
            partitions,
            ..
        }) = &marker
        {
            let name = table_tree(database, table);
            let tree = self.db.open_tree(&name)?;
            let mut rows = sled::Batch::default();
            for item in batch_rows(&tree, partitions, *ids) {
                rows.remove(item?.0);
            }
            tree.apply_batch(rows)?;
            // Hidden until gone: the range is dropped only after its rows.
            self.pending().remove(&name, key);
        }
        let mut staged = sled::Batch::default();
        for item in self.staging.scan_prefix(k) {
            staged.remove(item?.0);
        }
        self.staging.apply_batch(staged)?;
        self.prepared.remove(k)?;
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

    /// Committed rows of a table (JSON arrays).
    pub fn scan(&self, database: &str, table: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        self.each_visible(database, table, |stored| {
            for row in stored.rows() {
                out.push(String::from_utf8(row?.1.to_vec()).map_err(corrupt)?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// How many rows of a table a reader sees now (what [`Store::scan`] would return).
    pub fn count(&self, database: &str, table: &str) -> Result<usize> {
        let mut n = 0;
        self.each_visible(database, table, |stored| {
            n += stored.count;
            Ok(())
        })?;
        Ok(n)
    }

    /// Calls `each` with every stored entry of a table that a reader starting now sees (a row
    /// group holds rows of one batch: they are visible together).
    fn each_visible(
        &self,
        database: &str,
        table: &str,
        mut each: impl FnMut(Stored<'_>) -> Result<()>,
    ) -> Result<()> {
        let visibility = self.visibility(database, table);
        let Some(tree) = self.table(database, table)? else {
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
        database: &str,
        table: &str,
        complete: impl Fn(&mut Vec<serde_json::Value>),
        width: usize,
    ) -> Result<u64> {
        let Some(tree) = self.table(database, table)? else {
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
    fn table(&self, database: &str, table: &str) -> Result<Option<sled::Tree>> {
        let name = table_tree(database, table);
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
        s.prepare(key(seq), "d", "t", &rows).await.unwrap();
    }

    #[tokio::test]
    async fn prepared_rows_are_invisible_until_finalized_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        prepare(&s, 1, &[(0, "[1]"), (1, "[2]")]).await;
        prepare(&s, 2, &[(0, "[3]")]).await;
        assert!(s.scan("d", "t").unwrap().is_empty());
        assert_eq!(s.count("d", "t").unwrap(), 0, "count sees what scan sees");
        drop(s);
        let s = reopen(dir.path());
        assert_eq!(s.prepared_batches().unwrap(), vec![key(1), key(2)]);
        assert_eq!(s.finalize(key(1)).unwrap(), 2);
        assert_eq!(s.finalize(key(1)).unwrap(), 0, "finalize is idempotent");
        s.abort(key(2)).unwrap();
        let mut rows = s.scan("d", "t").unwrap();
        rows.sort();
        assert_eq!(rows, vec!["[1]", "[2]"]);
        assert_eq!(s.count("d", "t").unwrap(), 2);
        assert_eq!(s.count("d", "nope").unwrap(), 0);
        assert!(s.prepared_batches().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_reader_sees_neither_prepared_rows_nor_rows_newer_than_itself() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        prepare(&s, 1, &[(0, "[1]")]).await;
        s.finalize(key(1)).unwrap();
        let before = s.visibility("d", "t");
        prepare(&s, 2, &[(0, "[2]"), (3, "[3]")]).await;
        s.finalize(key(2)).unwrap();
        let tree = s.table("d", "t").unwrap().unwrap();
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
        assert_eq!(s.scan("d", "t").unwrap().len(), 3);
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
        assert!(s.scan("d", "t").unwrap().is_empty());
        drop(s);
        let s = reopen(dir.path());
        assert!(
            s.scan("d", "t").unwrap().is_empty(),
            "still hidden after reopen"
        );
        assert_eq!(s.finalize(key(2)).unwrap(), 2);
        let mut rows = s.scan("d", "t").unwrap();
        rows.sort();
        assert_eq!(rows, vec!["[3]", "[4]"]);
        assert_eq!(s.table("d", "t").unwrap().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn an_index_built_over_prepared_rows_shows_them_only_once_finalized() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        prepare(&s, 1, &[(0, "[5]"), (0, "[6]")]).await;
        prepare(&s, 2, &[(0, "[7]")]).await;
        s.finalize(key(2)).unwrap();
        let columns = r#"[{"name":"v","ty":"BigInt","nullable":true,"computed":null}]"#;
        assert_eq!(s.build_index("d", "t", "i", 0, columns).unwrap(), 1);
        let all = Range {
            lower: None,
            upper: None,
        };
        assert_eq!(
            s.scan_index("d", "t", "i", &all).unwrap().unwrap(),
            vec!["[7]"]
        );
        s.finalize(key(1)).unwrap();
        let mut rows = s.scan_index("d", "t", "i", &all).unwrap().unwrap();
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
        assert!(s.scan("d", "t").unwrap().is_empty());
        assert_eq!(s.finalize(key(9)).unwrap(), 1);
        assert_eq!(s.scan("d", "t").unwrap(), vec!["[42]"]);
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
        let tree = s.table("d", "t").unwrap().unwrap();
        assert_eq!(tree.len(), 4, "256 + 44 rows in each of two partitions");
        assert_eq!(s.count("d", "t").unwrap(), 0);
        s.finalize(key(1)).unwrap();
        let numbers = |rows: Vec<String>| -> Vec<i64> {
            let mut v: Vec<i64> = rows
                .iter()
                .map(|r| serde_json::from_str::<Vec<i64>>(r).unwrap()[0])
                .collect();
            v.sort_unstable();
            v
        };
        assert_eq!(
            numbers(s.scan("d", "t").unwrap()),
            (0..600).collect::<Vec<_>>()
        );
        assert_eq!(s.count("d", "t").unwrap(), 600);

        // Index lookups find single rows inside groups, across a group boundary too.
        let columns = r#"[{"name":"v","ty":"BigInt","nullable":true,"computed":null}]"#;
        assert_eq!(s.build_index("d", "t", "i", 0, columns).unwrap(), 600);
        let range = |lo: i64, hi: i64| Range {
            lower: Some((serde_json::json!(lo), true)),
            upper: Some((serde_json::json!(hi), true)),
        };
        let found = |lo, hi| {
            numbers(
                s.scan_index("d", "t", "i", &range(lo, hi))
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
        assert_eq!(s.count("d", "t").unwrap(), 600);

        // Backfill rewrites whole groups.
        let width = 2;
        let changed = s
            .backfill("d", "t", |r| r.push(serde_json::json!(0)), width)
            .unwrap();
        assert_eq!(changed, 600);
        assert_eq!(tree.len(), 4);
        assert!(s.scan("d", "t").unwrap().iter().all(|r| r.ends_with(",0]")));
        assert_eq!(found(256, 256), vec![256]);
        drop((s, tree));
        let s = reopen(dir.path());
        assert_eq!(s.count("d", "t").unwrap(), 600, "after reopen");
    }
}
