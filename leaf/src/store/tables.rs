//! Which table's storage a call is about, and how the rows of dropped tables go.
//!
//! A table's rows, indexes and prepared batches are stored under the catalog's table id, which
//! is never reused: a table created again under a dropped one's name starts empty. The master
//! tells each leaf which tables exist ([`LiveView`], with its heartbeat answer whenever the
//! catalog's table generation moved); the leaf then deletes the trees of every other table it
//! holds, so a leaf that was down during a DROP catches up when it returns. Tables from before
//! ids (id 0) are stored under their database and name, and go the same way.

use super::{corrupt, BatchKey, Marker, Result, Store, StoreError};
use std::collections::HashSet;

/// A table as the store knows it: the catalog's id, and its names (for tables from before ids,
/// and for messages).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableRef {
    pub id: u64,
    pub database: String,
    pub table: String,
}

const TABLE_PREFIX: &str = "table/";
const INDEX_PREFIX: &str = "index/";

impl TableRef {
    pub fn new(id: u64, database: &str, table: &str) -> Self {
        Self {
            id,
            database: database.into(),
            table: table.into(),
        }
    }

    /// The name of the tree holding the table's rows.
    pub(super) fn tree(&self) -> String {
        match self.id {
            0 => format!(
                "{TABLE_PREFIX}{}",
                serde_json::json!([self.database, self.table])
            ),
            id => format!("{TABLE_PREFIX}{id}"),
        }
    }

    /// The name of the tree holding one of the table's indexes.
    pub(super) fn index_tree(&self, index: &str) -> String {
        format!("{INDEX_PREFIX}{}", self.index_key(index))
    }

    /// The key of one of the table's indexes in the index registry.
    pub(super) fn index_key(&self, index: &str) -> String {
        match self.id {
            0 => serde_json::json!([self.database, self.table, index]).to_string(),
            id => format!("{id}/{index}"),
        }
    }

    /// What the registry keys of the table's indexes start with.
    pub(super) fn index_key_prefix(&self) -> String {
        match self.id {
            0 => {
                let key = serde_json::json!([self.database, self.table]).to_string();
                key[..key.len() - 1].to_string()
            }
            id => format!("{id}/"),
        }
    }
}

/// The tables that exist, as of one catalog generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveView {
    pub generation: u64,
    /// Ids above this were handed out after the view: such tables are kept.
    pub high: u64,
    pub ids: HashSet<u64>,
    /// (database, table) of the live tables from before ids.
    pub legacy: HashSet<(String, String)>,
}

impl LiveView {
    /// Whether the view says the table was dropped.
    pub fn dropped(&self, t: &TableRef) -> bool {
        match t.id {
            0 => !self.legacy.contains(&(t.database.clone(), t.table.clone())),
            id => id <= self.high && !self.ids.contains(&id),
        }
    }

    /// The table a stored tree (rows or an index) belongs to, if it is one of ours.
    fn owner(name: &str) -> Option<TableRef> {
        let parse_legacy = |json: &str| -> Option<TableRef> {
            let names: Vec<String> = serde_json::from_str(json).ok()?;
            Some(TableRef::new(0, names.first()?, names.get(1)?))
        };
        if let Some(rest) = name.strip_prefix(TABLE_PREFIX) {
            return match rest.parse::<u64>() {
                Ok(id) => Some(TableRef::new(id, "", "")),
                Err(_) => parse_legacy(rest),
            };
        }
        let rest = name.strip_prefix(INDEX_PREFIX)?;
        match rest.split_once('/') {
            Some((id, _)) if id.bytes().all(|b| b.is_ascii_digit()) => {
                Some(TableRef::new(id.parse().ok()?, "", ""))
            }
            _ => parse_legacy(rest),
        }
    }
}

impl Store {
    /// Holds off the removal of dropped tables while a writer puts rows (or an index) into
    /// `table`, and refuses a table already known to be dropped.
    pub(super) fn writing_to(
        &self,
        table: &TableRef,
    ) -> Result<std::sync::RwLockReadGuard<'_, Option<LiveView>>> {
        let view = self.live.read().unwrap_or_else(|e| e.into_inner());
        if view.as_ref().is_some_and(|v| v.dropped(table)) {
            return Err(StoreError::TableDropped {
                database: table.database.clone(),
                table: table.table.clone(),
            });
        }
        Ok(view)
    }

    /// The generation of the last [`LiveView`] whose dropped tables are all gone (0: none
    /// since the leaf started).
    pub fn tables_generation(&self) -> u64 {
        self.swept.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Deletes everything stored for tables the view says were dropped: rows, indexes, index
    /// registrations and prepared batches. Returns the names of the trees dropped. From its
    /// start, writes into those tables are refused; their trees go after the lock is released
    /// (dropping a big tree takes a while, and writers of other tables wait for nobody).
    pub fn retain_tables(&self, view: LiveView) -> Result<Vec<String>> {
        let generation = view.generation;
        {
            let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
            let mut registrations = sled::Batch::default();
            for item in self.indexes.iter() {
                let (k, v) = item?;
                let def: super::index::IndexDef = serde_json::from_slice(&v).map_err(corrupt)?;
                if view.dropped(&def.table_ref()) {
                    registrations.remove(k);
                }
            }
            self.indexes.apply_batch(registrations)?;
            // Batches prepared into dropped tables: nothing of them is left to finalize or abort.
            for item in self.prepared.iter() {
                let (k, m) = item?;
                let marker: Marker = serde_json::from_slice(&m).map_err(corrupt)?;
                let table = marker.table_ref();
                if !view.dropped(&table) {
                    continue;
                }
                let key = BatchKey::from_bytes(&k).ok_or_else(|| corrupt("batch key"))?;
                let mut staged = sled::Batch::default();
                for item in self.staging.scan_prefix(&k) {
                    staged.remove(item?.0);
                }
                self.staging.apply_batch(staged)?;
                // Settled for good: whether or not it committed, nothing will ask again.
                self.finalized.insert(&k, &[])?;
                self.prepared.remove(&k)?;
                self.pending().remove(&table.tree(), key);
            }
            *live = Some(view.clone());
        }
        let mut dropped = Vec::new();
        let _flushing = self.flush_lock.lock().unwrap_or_else(|e| e.into_inner());
        for name in self.db.tree_names() {
            let name = String::from_utf8_lossy(&name).into_owned();
            if LiveView::owner(&name).is_some_and(|t| view.dropped(&t)) {
                self.db.drop_tree(&name)?;
                self.columns.remove(name.as_bytes())?;
                dropped.push(name);
            }
        }
        // Column segments, also of tables whose row segment went before.
        for part in self.segments.all() {
            let tree = &part.manifest.tree;
            if LiveView::owner(tree).is_some_and(|t| view.dropped(&t)) {
                self.segments.drop_table(tree)?;
                if !dropped.contains(tree) {
                    dropped.push(tree.clone());
                }
            }
        }
        if !dropped.is_empty() {
            tracing::info!(trees = ?dropped, generation, "removed the storage of dropped tables");
        }
        self.swept
            .store(generation, std::sync::atomic::Ordering::Relaxed);
        Ok(dropped)
    }

    /// The ids of the tables this leaf stores rows of (0 for each table from before ids).
    pub fn stored_tables(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .db
            .tree_names()
            .iter()
            .filter_map(|n| {
                let name = std::str::from_utf8(n).ok()?;
                name.starts_with(TABLE_PREFIX)
                    .then(|| LiveView::owner(name).map(|t| t.id))
                    .flatten()
            })
            .collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_names_name_their_table() {
        let t = TableRef::new(7, "d", "t");
        assert_eq!(t.tree(), "table/7");
        assert_eq!(t.index_tree("i"), "index/7/i");
        let owner = LiveView::owner(&t.index_tree("a/b")).unwrap();
        assert_eq!(owner.id, 7);
        let legacy = TableRef::new(0, "d", "t");
        assert_eq!(legacy.tree(), r#"table/["d","t"]"#);
        assert_eq!(LiveView::owner(&legacy.tree()), Some(legacy.clone()));
        assert_eq!(LiveView::owner(&legacy.index_tree("i")), Some(legacy));
        assert_eq!(LiveView::owner("prepared"), None);
    }

    #[test]
    fn a_view_keeps_live_and_newer_tables() {
        let view = LiveView {
            generation: 3,
            high: 5,
            ids: [2, 5].into(),
            legacy: [("d".to_string(), "old".to_string())].into(),
        };
        assert!(view.dropped(&TableRef::new(1, "d", "t")));
        assert!(!view.dropped(&TableRef::new(2, "d", "t")));
        assert!(
            !view.dropped(&TableRef::new(6, "d", "t")),
            "newer than the view"
        );
        assert!(!view.dropped(&TableRef::new(0, "d", "old")));
        assert!(view.dropped(&TableRef::new(0, "d", "gone")));
    }
}
