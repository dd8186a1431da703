//! The leaf's partition store in sled.
//!
//! - one tree per table (`table/<db>/<table>` as JSON): key = partition (u32 BE) + row id
//!   (u64 BE), value = the row as a JSON array of column values — committed rows only;
//! - tree `staging`: rows of prepared batches, key = batch key + row key;
//! - tree `prepared`: one marker per prepared batch (which table).
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
}

fn table_tree(database: &str, table: &str) -> String {
    format!("table/{}", serde_json::json!([database, table]))
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new().path(dir).open()?;
        Ok(Self {
            staging: db.open_tree("staging")?,
            prepared: db.open_tree("prepared")?,
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
        tree.apply_batch(rows)?;
        self.staging.apply_batch(staged)?;
        self.prepared.remove(k)?;
        Ok(n)
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
        let name = table_tree(database, table);
        if !self
            .db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == name.as_bytes())
        {
            return Ok(vec![]);
        }
        let tree = self.db.open_tree(name)?;
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
        let name = table_tree(database, table);
        if !self
            .db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == name.as_bytes())
        {
            return Ok(0);
        }
        let tree = self.db.open_tree(name)?;
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
