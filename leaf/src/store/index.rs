//! Secondary indexes: the registry of indexes (tree `indexes`), and one tree per index whose
//! key is the indexed value's order-preserving encoding + the row key, written when rows become
//! visible.

use super::rows::{get_row, Stored};
use super::tables::TableRef;
use super::{corrupt, Range, Result, Store};
use serde::{Deserialize, Serialize};

/// A registered index: which column, and the table's columns to compute it for old rows.
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct IndexDef {
    pub database: String,
    pub table: String,
    /// The table's id (absent in definitions of tables from before ids: 0).
    #[serde(default)]
    pub table_id: u64,
    pub name: String,
    pub position: usize,
    pub columns_json: String,
}

impl IndexDef {
    pub fn table_ref(&self) -> TableRef {
        TableRef {
            id: self.table_id,
            database: self.database.clone(),
            table: self.table.clone(),
        }
    }
}

/// An index with its table's columns, compiled.
pub(super) type Compiled = (
    Vec<common::catalog::tables::TableColumn>,
    Vec<Option<common::expr::Expr>>,
);

/// An index's entry for a stored row: the indexed value's encoding, then the row key.
pub(super) fn index_entry(
    row_key: &[u8],
    row: &[u8],
    def: &IndexDef,
    compiled: &Compiled,
) -> Result<Vec<u8>> {
    let mut key = common::expr::index_key(&indexed_value(row, def, compiled)?);
    key.extend_from_slice(row_key);
    Ok(key)
}

/// The indexed value of a stored row, computing a column the row predates.
fn indexed_value(row: &[u8], def: &IndexDef, compiled: &Compiled) -> Result<serde_json::Value> {
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
    /// The indexes registered on a table, compiled.
    pub(super) fn table_indexes(&self, table: &TableRef) -> Result<Vec<(IndexDef, Compiled)>> {
        let prefix = table.index_key_prefix();
        let mut out = Vec::new();
        for item in self.indexes.scan_prefix(prefix.as_bytes()) {
            let (_, v) = item?;
            let def: IndexDef = serde_json::from_slice(&v).map_err(corrupt)?;
            if def.table_ref() != *table {
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
        table: &TableRef,
        name: &str,
        position: usize,
        columns: &[common::catalog::tables::TableColumn],
    ) -> Result<u64> {
        let columns_json = serde_json::to_string(columns).map_err(corrupt)?;
        let columns_json = columns_json.as_str();
        let def = IndexDef {
            database: table.database.clone(),
            table: table.table.clone(),
            table_id: table.id,
            name: name.into(),
            position,
            columns_json: columns_json.into(),
        };
        let columns = columns.to_vec();
        let compiled = (
            columns.clone(),
            common::expr::compile_table(&columns).map_err(corrupt)?,
        );
        // Not for a dropped table: its trees would outlive it (checked again at the end: the
        // build takes long, and writers must not wait for it).
        drop(self.writing_to(table)?);
        self.indexes.insert(
            table.index_key(name).as_bytes(),
            serde_json::to_vec(&def).map_err(corrupt)?,
        )?;
        let index = self.db.open_tree(table.index_tree(name))?;
        let visibility = self.visibility(table);
        let Some(tree) = self.table(table)? else {
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
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        if live.as_ref().is_some_and(|v| v.dropped(table)) {
            // Dropped while it was built: what it wrote goes too.
            self.drop_index(table, name)?;
            return Err(super::StoreError::TableDropped {
                database: table.database.clone(),
                table: table.table.clone(),
            });
        }
        Ok(n)
    }

    pub fn drop_index(&self, table: &TableRef, name: &str) -> Result<()> {
        self.indexes.remove(table.index_key(name).as_bytes())?;
        self.db.drop_tree(table.index_tree(name))?;
        Ok(())
    }

    /// Committed rows whose indexed value is in `range`, via the index; `None` if this leaf
    /// has no such index (the caller scans instead).
    pub fn scan_index(
        &self,
        table: &TableRef,
        index: &str,
        range: &Range,
        snapshot: &super::TableSnapshot,
    ) -> Result<Option<Vec<String>>> {
        if self
            .indexes
            .get(table.index_key(index).as_bytes())?
            .is_none()
        {
            return Ok(None);
        }
        let Some(tree) = self.table(table)? else {
            return Ok(Some(vec![]));
        };
        let idx = self.db.open_tree(table.index_tree(index))?;
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
            // Rows in column segments are read from there (the filter above keeps the
            // matching ones); the index serves the row segment.
            if !snapshot.tail_row(row_key) {
                continue;
            }
            if let Some(v) = get_row(&tree, row_key)? {
                out.push(String::from_utf8(v).map_err(corrupt)?);
            }
        }
        Ok(Some(out))
    }
}
