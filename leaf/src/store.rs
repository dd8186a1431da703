//! The leaf's partition store in sled.
//!
//! - one tree per table (`table/<db>/<table>` as JSON): key = partition (u32 BE) + row id
//!   (u64 BE), value = the row as a JSON array of column values — committed rows only;
//! - tree `staging`: rows of prepared batches, key = batch key + row key;
//! - tree `prepared`: one marker per prepared batch (which table).
//!
//! - tree `indexes`: registered secondary indexes; tree `index/<db>/<table>/<index>`: key =
//!   order-preserving value encoding + row key, maintained when rows become visible.
//!
//! A prepared batch is durable and invisible. Finalizing copies its rows into the table under
//! the row keys chosen at prepare time, so finalizing twice (after a crash) writes the same
//! rows again rather than new ones. Aborting deletes the staged rows.

use serde::{Deserialize, Serialize};
use std::path::Path;

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

impl Store {
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new().path(dir).open()?;
        Ok(Self {
            staging: db.open_tree("staging")?,
            prepared: db.open_tree("prepared")?,
            indexes: db.open_tree("indexes")?,
            db,
        })
    }

    /// Writes a batch's rows (partition, JSON row) durably and invisibly.
    pub async fn prepare(
        &self,
        key: BatchKey,
        database: &str,
        table: &str,
        rows: &[(u32, String)],
    ) -> Result<()> {
        let k = key.bytes();
        let mut batch = sled::Batch::default();
        for (partition, row) in rows {
            let id = self.db.generate_id()?;
            let mut sk = k.to_vec();
            sk.extend_from_slice(&partition.to_be_bytes());
            sk.extend_from_slice(&id.to_be_bytes());
            batch.insert(sk, row.as_bytes());
        }
        self.staging.apply_batch(batch)?;
        let marker = Marker {
            database: database.into(),
            table: table.into(),
            rows: rows.len() as u64,
        };
        let m = serde_json::to_vec(&marker).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.prepared.insert(k, m)?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Makes a committed batch's rows visible (idempotent).
    pub fn finalize(&self, key: BatchKey) -> Result<u64> {
        let k = key.bytes();
        let Some(m) = self.prepared.get(k)? else {
            return Ok(0); // already finalized or aborted
        };
        let marker: Marker =
            serde_json::from_slice(&m).map_err(|e| StoreError::Corrupt(e.to_string()))?;
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
                let mut key = common::expr::index_key(&indexed_value(&v, def, compiled)?);
                key.extend_from_slice(row_key);
                batch.insert(key, &[] as &[u8]);
            }
        }
        // Index entries first: a row is never visible without them.
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

    /// Registers an index (maintained by every later finalize) and indexes the rows already
    /// visible. Returns how many rows were indexed.
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
        let Some(tree) = self.table(database, table)? else {
            return Ok(0);
        };
        let mut n = 0;
        let mut batch = sled::Batch::default();
        for item in tree.iter() {
            let (k, v) = item?;
            let mut key = common::expr::index_key(&indexed_value(&v, &def, &compiled)?);
            key.extend_from_slice(&k);
            batch.insert(key, &[] as &[u8]);
            n += 1;
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
            if let Some(v) = tree.get(row_key)? {
                out.push(String::from_utf8(v.to_vec()).map_err(corrupt)?);
            }
        }
        Ok(Some(out))
    }

    /// Drops a batch that will never commit.
    pub fn abort(&self, key: BatchKey) -> Result<()> {
        let k = key.bytes();
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
        let Some(tree) = self.table(database, table)? else {
            return Ok(vec![]);
        };
        tree.iter()
            .values()
            .map(|v| {
                let v = v?;
                String::from_utf8(v.to_vec()).map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .collect()
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
            let mut row: Vec<serde_json::Value> =
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if row.len() >= width {
                continue;
            }
            complete(&mut row);
            let new = serde_json::to_vec(&row).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            // Only replace what we read: a concurrent writer's version wins.
            if tree.compare_and_swap(&k, Some(v), Some(new))?.is_ok() {
                n += 1;
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

    #[tokio::test]
    async fn prepared_rows_are_invisible_until_finalized_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.prepare(key(1), "d", "t", &[(0, "[1]".into()), (1, "[2]".into())])
            .await
            .unwrap();
        s.prepare(key(2), "d", "t", &[(0, "[3]".into())])
            .await
            .unwrap();
        assert!(s.scan("d", "t").unwrap().is_empty());
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.prepared_batches().unwrap(), vec![key(1), key(2)]);
        assert_eq!(s.finalize(key(1)).unwrap(), 2);
        assert_eq!(s.finalize(key(1)).unwrap(), 0, "finalize is idempotent");
        s.abort(key(2)).unwrap();
        let mut rows = s.scan("d", "t").unwrap();
        rows.sort();
        assert_eq!(rows, vec!["[1]", "[2]"]);
        assert!(s.prepared_batches().unwrap().is_empty());
    }
}
