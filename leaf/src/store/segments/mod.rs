//! Column segments: a table's committed rows, partition by partition, in immutable Parquet
//! files, listed in a manifest per partition.
//!
//! Rows land in the row segment (the table's sled tree) as batches commit. Once a partition's
//! row segment holds enough committed rows, the flusher ([`super::flush`]) writes them into a
//! new segment file and then swaps the partition's manifest (written whole to a temporary file,
//! synced, renamed over the old one), which records the file and the highest row id it covers
//! (`flushed_through`). Readers take the rows up to `flushed_through` from the manifest's files
//! and later ones from the row segment, so a row is read from one place whatever the moment:
//!
//! - a crash before the rename leaves the old manifest, an unlisted file (deleted at start)
//!   and the rows still in the row segment: nothing lost, nothing twice;
//! - a crash after it leaves rows at or below `flushed_through` in the row segment, which
//!   readers skip and the start deletes.
//!
//! Files and row-segment rows that a new manifest replaces are deleted only once no reader
//! holds a snapshot of the old one ([`Segments::collect`]).
//!
//! Layout: `<store>/segments/<table>/p<partition>/MANIFEST` and `seg-<n>.parquet`.

pub mod build;
pub mod file;
pub mod json;

use super::{corrupt, Result, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

const MANIFEST: &str = "MANIFEST";

/// Statistics of one column of a segment (JSON values; strings cut to a prefix).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ColumnStats {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<serde_json::Value>,
    pub nulls: u64,
}

/// One segment file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentMeta {
    /// The file is `seg-<id>.parquet`.
    pub id: u64,
    pub rows: u64,
    /// Size of the file.
    pub bytes: u64,
    /// The row ids the segment holds lie in `first_row_id..=last_row_id`.
    pub first_row_id: u64,
    pub last_row_id: u64,
    pub columns: Vec<ColumnStats>,
    /// The JSON sub-columns the segment keeps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub json: Vec<json::SubColumn>,
}

impl SegmentMeta {
    pub fn file_name(&self) -> String {
        format!("seg-{}.parquet", self.id)
    }
}

/// What a partition's manifest says: its segments, and the row ids they cover.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionManifest {
    /// The sled tree of the table (its identity in the store).
    pub tree: String,
    pub partition: u32,
    /// Every committed row of the partition with an id up to this one is in `segments`
    /// (`None`: nothing flushed yet; row ids start at 0).
    pub flushed_through: Option<u64>,
    pub segments: Vec<SegmentMeta>,
    /// The id the next segment gets.
    pub next_id: u64,
}

/// A partition's manifest as readers see it, with where its files are.
#[derive(Debug)]
pub struct PartitionSnapshot {
    pub dir: PathBuf,
    pub manifest: PartitionManifest,
}

impl PartitionSnapshot {
    pub fn path(&self, s: &SegmentMeta) -> PathBuf {
        self.dir.join(s.file_name())
    }
}

/// Row-segment rows now in a segment: (tree, partition, highest row id).
pub type FlushedRows = (String, u32, u64);

/// Work left once no reader holds an older snapshot.
#[derive(Debug)]
pub struct Cleanup {
    /// Files no manifest lists any more.
    pub files: Vec<PathBuf>,
    /// (tree, partition, through): row-segment rows now in segments.
    pub rows: Option<FlushedRows>,
}

/// Every partition's current manifest.
#[derive(Debug)]
pub struct Segments {
    root: PathBuf,
    state: RwLock<State>,
    /// Epochs replaced (table tree, epoch), with what to delete once no reader of them is
    /// left.
    retired: Mutex<Vec<(String, Arc<()>, Cleanup)>>,
}

#[derive(Debug, Default)]
struct State {
    current: HashMap<(String, u32), Arc<PartitionSnapshot>>,
    /// Per table: held by every reader of it that started since the table's last install. A
    /// cleanup waits until the epoch it was retired with has no reader left, whichever of the
    /// table's partitions they read; readers of other tables hold nothing up.
    epochs: HashMap<String, Arc<()>>,
}

/// What one reader sees of a table's segments; what it lists stays until it is dropped.
#[derive(Debug)]
pub struct ReadSnapshot {
    pub partitions: HashMap<u32, Arc<PartitionSnapshot>>,
    _epoch: Arc<()>,
}

impl ReadSnapshot {
    /// Whether the row `id` of `partition` is read from the snapshot's segments (not from the
    /// row segment).
    pub fn in_segments(&self, partition: u32, id: u64) -> bool {
        self.partitions
            .get(&partition)
            .and_then(|s| s.manifest.flushed_through)
            .is_some_and(|through| id <= through)
    }
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Corrupt(format!("segment files: {e}"))
}

/// The directory name of a table's segments.
fn table_dir(tree: &str) -> String {
    match tree.strip_prefix("table/") {
        Some(id) if id.bytes().all(|b| b.is_ascii_digit()) => id.to_string(),
        _ => format!(
            "legacy-{}",
            tree.bytes().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

/// Writes `bytes` to `path` durably and atomically (temporary file, sync, rename, sync dir).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    sync_dir(path)
}

/// Syncs the directory holding `path`, so a rename or a new file in it survives a crash.
pub fn sync_dir(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

impl Segments {
    /// Loads every manifest under `root` and deletes files none lists (a flush that crashed
    /// before its manifest). Returns them with the row-segment rows to delete (a crash after a
    /// manifest, before its rows went).
    pub fn open(root: PathBuf) -> Result<(Self, Vec<FlushedRows>)> {
        std::fs::create_dir_all(&root).map_err(io)?;
        let mut state = State::default();
        let mut stale_rows = Vec::new();
        for table in std::fs::read_dir(&root).map_err(io)? {
            let table = table.map_err(io)?.path();
            if !table.is_dir() {
                continue;
            }
            for part in std::fs::read_dir(&table).map_err(io)? {
                let dir = part.map_err(io)?.path();
                let path = dir.join(MANIFEST);
                let manifest: PartitionManifest = match std::fs::read(&path) {
                    Ok(b) => serde_json::from_slice(&b).map_err(corrupt)?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        // Never got a manifest: its files hold nothing anyone reads.
                        std::fs::remove_dir_all(&dir).map_err(io)?;
                        continue;
                    }
                    Err(e) => return Err(io(e)),
                };
                let listed: std::collections::HashSet<String> = manifest
                    .segments
                    .iter()
                    .map(SegmentMeta::file_name)
                    .collect();
                for f in std::fs::read_dir(&dir).map_err(io)? {
                    let f = f.map_err(io)?;
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name != MANIFEST && !listed.contains(&name) {
                        tracing::info!(file = %f.path().display(), "removing a segment file no manifest lists");
                        std::fs::remove_file(f.path()).map_err(io)?;
                    }
                }
                if let Some(through) = manifest.flushed_through {
                    stale_rows.push((manifest.tree.clone(), manifest.partition, through));
                }
                state.current.insert(
                    (manifest.tree.clone(), manifest.partition),
                    Arc::new(PartitionSnapshot { dir, manifest }),
                );
            }
        }
        Ok((
            Self {
                root,
                state: RwLock::new(state),
                retired: Mutex::default(),
            },
            stale_rows,
        ))
    }

    /// The directory of a partition's segments.
    pub fn partition_dir(&self, tree: &str, partition: u32) -> PathBuf {
        self.root
            .join(table_dir(tree))
            .join(format!("p{partition}"))
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The current manifests of a table's partitions, as one reader's snapshot.
    pub fn snapshot(&self, tree: &str) -> ReadSnapshot {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let epoch = state.epochs.entry(tree.to_string()).or_default().clone();
        ReadSnapshot {
            partitions: state
                .current
                .iter()
                .filter(|((t, _), _)| t == tree)
                .map(|((_, p), s)| (*p, s.clone()))
                .collect(),
            _epoch: epoch,
        }
    }

    /// A partition's current manifest (an empty one if it has none yet).
    pub fn manifest(&self, tree: &str, partition: u32) -> PartitionManifest {
        self.state()
            .current
            .get(&(tree.to_string(), partition))
            .map(|s| s.manifest.clone())
            .unwrap_or_else(|| PartitionManifest {
                tree: tree.to_string(),
                partition,
                ..Default::default()
            })
    }

    /// Every partition's current manifest.
    pub fn all(&self) -> Vec<Arc<PartitionSnapshot>> {
        self.state().current.values().cloned().collect()
    }

    /// Makes `manifest` the partition's current one (durably first); `cleanup` runs once no
    /// reader that started before is left.
    pub fn install(&self, manifest: PartitionManifest, cleanup: Cleanup) -> Result<()> {
        let dir = self.partition_dir(&manifest.tree, manifest.partition);
        std::fs::create_dir_all(&dir).map_err(io)?;
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(corrupt)?;
        write_atomically(&dir.join(MANIFEST), &bytes)?;
        let tree = manifest.tree.clone();
        let key = (tree.clone(), manifest.partition);
        let new = Arc::new(PartitionSnapshot { dir, manifest });
        let old_epoch = {
            let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
            state.current.insert(key, new);
            std::mem::take(state.epochs.entry(tree.clone()).or_default())
        };
        self.retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((tree, old_epoch, cleanup));
        Ok(())
    }

    /// The cleanups no reader holds up any more (taken out of the list). A cleanup waits for
    /// every reader of its table that started before its install, and those hold the table's
    /// older epochs too: per table, the free ones are the oldest, up to the first still held.
    pub fn collect(&self) -> Vec<Cleanup> {
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        let mut held: std::collections::HashSet<String> = Default::default();
        let mut free = Vec::new();
        let mut kept = Vec::new();
        for (tree, epoch, cleanup) in std::mem::take(&mut *retired) {
            if !held.contains(&tree) && Arc::strong_count(&epoch) == 1 {
                free.push(cleanup);
            } else {
                held.insert(tree.clone());
                kept.push((tree, epoch, cleanup));
            }
        }
        *retired = kept;
        free
    }

    /// Forgets and deletes every segment of a dropped table.
    pub fn drop_table(&self, tree: &str) -> Result<()> {
        self.state
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .retain(|(t, _), _| t != tree);
        let dir = self.root.join(table_dir(tree));
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(tree: &str, through: u64, ids: &[u64]) -> PartitionManifest {
        PartitionManifest {
            tree: tree.into(),
            partition: 3,
            flushed_through: Some(through),
            segments: ids
                .iter()
                .map(|id| SegmentMeta {
                    id: *id,
                    rows: 1,
                    bytes: 1,
                    first_row_id: 1,
                    last_row_id: through,
                    columns: vec![],
                    json: vec![],
                })
                .collect(),
            next_id: ids.iter().max().map_or(0, |m| m + 1),
        }
    }

    #[test]
    fn a_restart_keeps_listed_files_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("segments");
        let (s, _) = Segments::open(root.clone()).unwrap();
        let pdir = s.partition_dir("table/7", 3);
        std::fs::create_dir_all(&pdir).unwrap();
        std::fs::write(pdir.join("seg-0.parquet"), b"listed").unwrap();
        std::fs::write(pdir.join("seg-1.parquet"), b"a crash before the manifest").unwrap();
        s.install(
            manifest("table/7", 10, &[0]),
            Cleanup {
                files: vec![],
                rows: None,
            },
        )
        .unwrap();
        drop(s);
        let (s, stale) = Segments::open(root).unwrap();
        assert!(pdir.join("seg-0.parquet").exists());
        assert!(!pdir.join("seg-1.parquet").exists());
        assert_eq!(stale, vec![("table/7".to_string(), 3, 10)]);
        assert_eq!(s.manifest("table/7", 3).flushed_through, Some(10));
        assert_eq!(s.manifest("table/7", 4).flushed_through, None);
    }

    #[test]
    fn cleanup_waits_for_readers_of_the_old_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = Segments::open(dir.path().join("segments")).unwrap();
        let none = || Cleanup {
            files: vec![],
            rows: None,
        };
        s.install(manifest("table/1", 5, &[0]), none()).unwrap();
        assert_eq!(
            s.collect().len(),
            1,
            "nobody read before the first manifest"
        );
        let reader = s.snapshot("table/1");
        s.install(manifest("table/1", 9, &[1]), none()).unwrap();
        assert!(s.collect().is_empty(), "a reader holds the old manifest");
        // Another partition's install: its cleanup also waits for the reader, which started
        // before it (and read that partition's rows where they were then).
        let mut other = manifest("table/1", 4, &[0]);
        other.partition = 4;
        s.install(other, none()).unwrap();
        assert!(
            s.collect().is_empty(),
            "the reader started before both installs"
        );
        // Another table's cleanups do not wait for a reader of this one.
        s.install(manifest("table/2", 4, &[0]), none()).unwrap();
        assert_eq!(s.collect().len(), 1, "table/2 has no reader");
        drop(reader);
        assert_eq!(s.collect().len(), 2);
    }
}
